"""Training on several machines with ``tf.distribute.MultiWorkerMirroredStrategy``.

* :mod:`~sparselayers.distribute.keras_mwms_fix`: the workaround that lets
  Keras' ``model.fit`` run under the strategy (keras-team/keras#20585).
* :mod:`~sparselayers.distribute.agreement`: what RigL and SET use so that
  every worker reaches the same pattern.
* :mod:`~sparselayers.distribute.data`: ``tf.data`` input from matrices that
  do not fit in memory (NumPy memmap, HDF5), sharded per worker.
"""

from sparselayers.distribute import agreement, data, keras_mwms_fix
from sparselayers.distribute.data import sharded_batches

__all__ = ["agreement", "data", "keras_mwms_fix", "sharded_batches"]
