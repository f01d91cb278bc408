"""Dynamic sparse training and gradual pruning: the pattern of every sparse layer evolves during `fit`.

:class:`GradualPruning` prunes by magnitude on a polynomial schedule (its
own module, :mod:`sparselayers.callbacks.gradual_pruning`, documents it);
the rest of this page is about :class:`SET` and :class:`RigL`.

:class:`SET` (Mocanu et al., 2018) and :class:`RigL` (Evci et al., 2020) are
Keras callbacks. Unlike mask-based implementations, the layers keep truly
sparse storage the whole time: each update replaces a layer's pattern and
``values`` in place (:meth:`SparseKernelLayer.set_pattern`), so the model never
holds a dense kernel, and training between updates runs exactly as with a
fixed pattern.

Semantics, shared by both callbacks:

* **Layers.** Every built sparse layer of the model (``SparseDense``,
  ``SparseConv*``, sparse attention projections, ``SparseEmbedding``), at any depth
  (nested models, the ``tower_layers`` of :class:`Towers`), or only those
  whose ``name`` or ``path`` is listed in ``layers``. A layer with no room to
  evolve (``nnz == 0``, or every position connected, as the first layer of
  ``Towers``) is skipped with a warning; naming it in ``layers`` raises.
* **Schedule.** Step ``t`` counts training steps: the callback's own count
  (``callback.step``), not ``optimizer.iterations``, which loss scaling and
  gradient accumulation decouple from the steps, and which a fresh optimizer
  leaves at 0 after ``load_weights``. Each evolving layer carries the count
  in its saved state (:mod:`sparselayers.evolution_step`: ``.keras``,
  ``.weights.h5``, so ``ModelCheckpoint`` and ``BackupAndRestore``, and
  ``tf.train.Checkpoint``), and a new ``fit`` or :meth:`~SET.attach`
  continues from it, so a resumed run keeps its schedule. A model whose
  layers carry no count starts at 0, with a warning if its optimizer has
  already run steps (legacy ``.h5`` files and ``get_weights`` do not carry
  it). At the
  end of step ``t``, when ``t % update_freq == 0`` and ``t < end_step``, every
  layer drops and grows ``n = round(f(t) * nnz)`` connections, with the
  cosine decay ``f(t) = drop_fraction * (1 + cos(pi * t / end_step)) / 2``.
  ``end_step`` defaults to 75% of the steps ``fit`` runs (``steps * epochs``).
  With ``steps_per_execution > 1``, an update falls at the end of the
  execution that holds its step.
* **Drop.** The ``n`` entries of smallest ``|value|`` (equal magnitudes: the
  earlier entry in canonical order first).
* **Grow.** ``n`` positions outside the kept entries (a position just dropped
  may be grown again). SET draws them uniformly at random from a NumPy
  Generator seeded with ``(seed, t, layer number)``. RigL takes the largest
  ``|dL/dW|``, the dense kernel gradient of the loss on the batch of step
  ``t`` at the weights after that step (equal magnitudes: lower row-major
  position first); positions with zero gradient are never preferred, and if
  fewer than ``n`` positions have a nonzero gradient the rest are grown as
  SET grows them.
* **State.** ``nnz`` never changes. A new connection starts at 0 with zeroed
  optimizer state (every optimizer variable that shadows ``values``: Adam's
  moments, momentum, EMA averages, gradient accumulators). A kept
  connection, including one dropped and grown again, keeps its value and its
  optimizer state, both moved to its new place in the canonical order.
* **Cost.** An update runs eagerly between two steps: the drop and grow
  in NumPy, RigL's forward and backward pass on the batch and tiled
  scoring. The model's compiled functions are then rebuilt
  (:func:`reset_compiled_functions`), because traced functions hold the
  pattern's indices as constants: the step after an update traces (with
  ``jit_compile=True``, compiles) the train step once. Every other step runs
  the function of a fixed pattern of the new structure, at its speed.
* **Memory (RigL).** The dense gradient ``x.T @ dy`` is never materialised:
  it is scored in column tiles of ``max(tile_elements, input_dim)`` entries
  at most, keeping a running top-``n``. Beyond the forward and backward pass
  on the batch (which keeps each layer's input ``x`` and the gradient ``dy``
  of ``x @ W``), an update holds at most three tile-sized float32 arrays
  (product, magnitude, masked copy) and ``4 * n`` candidate scores and
  positions: with the default ``tile_elements = 2**22``, 48 MiB plus
  ``16 * n`` bytes, whatever the layer's size.
* **Batch (RigL).** During ``fit`` RigL wraps ``model.train_function`` so
  that it sees the batch: the wrapper takes each batch from ``fit``'s
  iterator itself and runs Keras' own compiled one-step function on it (the
  path Keras takes for Python iterables: the same ``train_step``, compiled
  as ``fit`` compiles it), keeping the batch of a step that ends in an
  update. With ``steps_per_execution > 1`` only those steps take this path
  (so they trace it too), the others pass through untouched. This works
  eagerly, compiled, with ``jit_compile=True`` and under ``tf.distribute``
  strategies, where the replicas' shares are joined into the global batch
  (on one machine: under ``MultiWorkerMirroredStrategy`` a worker would see
  only its own share, and Keras' ``fit`` does not run there anyway). The gradient is that of ``model.compute_loss`` with ``training=True``, in
  a ``keras.StatelessScope``: the probe moves no metric, batch-norm
  statistic or random seed.
* **Custom training loops.** ``callback.attach(model)`` (or
  ``attach(model, optimizer=opt)``), then ``callback.after_step(batch=(x, y))``
  after each step of your loop: it counts the step and, at an update step,
  drops and grows and returns the update's records (an empty list
  otherwise). ``end_step`` is required; RigL needs the batch and a model
  compiled with its loss. A ``tf.function`` traced before an update is stale
  (it raises; with ``jit_compile=True`` it returns NaN): trace it again
  when ``after_step`` returns records.
* **Distribution and saving.** Updates assign the (mirrored) variables in
  cross-replica context, so every replica holds the same pattern. The
  pattern is saved with the values (``.keras``, ``.weights.h5``,
  ``tf.train.Checkpoint``), and the schedule and SET's draws depend only on
  the step and the seed: restoring a checkpoint written mid-training and calling
  ``fit(..., initial_epoch=...)`` continues the run identically (with the
  optimizer's state restored too; without it, the schedule and the pattern
  continue, the moments restart).
* **Not with** ``EarlyStopping(restore_best_weights=True)``: Keras restores
  those with ``model.set_weights``, which carries values but no pattern, so
  the best epoch's values would land on the last epoch's connections. So
  ``fit`` raises ``ValueError`` at its start when one runs beside RigL or
  SET. Keep the best model with ``ModelCheckpoint(path, save_best_only=True)``
  (a ``.keras`` or ``.weights.h5`` file carries the pattern and the step
  count) and load it after ``fit``; ``EarlyStopping`` without the restore
  may still stop the run. Any other ``get_weights``/``set_weights`` round
  trip across a topology update is the caller's to avoid (nothing can
  detect it).
* **Faults.** ``BackupAndRestore`` (``save_freq="epoch"``) resumes a run
  that crashed mid-epoch exactly where the uninterrupted run goes, with
  ``jit_compile=True`` too: at the first step of ``fit`` the callbacks read
  the restored step count and rebuild the model's compiled functions if a
  pattern changed since they were traced. With ``steps_per_execution > 1``
  the count follows the steps that ran (the last execution of an epoch may
  run fewer); when ``fit`` cannot tell the steps per epoch, a warning says
  the count may run ahead.
"""


from sparselayers.callbacks.dynamic import cosine_drop_fraction, optimizer_slots, random_positions, top_gradient_positions
from sparselayers.callbacks.gradual_pruning import GradualPruning
from sparselayers.callbacks.rigl import RigL
from sparselayers.callbacks.set import SET
from sparselayers.sparse_dense import sparse_dense_layers
from sparselayers.sparse_kernel import sparse_layers

__all__ = ["GradualPruning", "RigL", "SET", "cosine_drop_fraction", "sparse_dense_layers", "sparse_layers"]
