"""Knowledge-driven networks: layers from mapping tables, read back with names.

Biological knowledge often comes as mapping tables (SNP -> gene,
gene -> pathway, pathway -> phenotype). :func:`chain` turns a list of them
into ``SparseDense`` layers whose patterns carry the names, checking that
consecutive tables meet and reporting units left without connections;
:func:`read_topology` reads GenNet's ``topology.csv`` into such tables.
Trained layers are read back with names: :func:`layer_frame` (also
``SparseDense.to_frame()``) lists every weight, :func:`path_weights` and
:func:`gradient_x_input` rank the units of any level for an output, and
:func:`sparselayers.plotting.plot_manhattan` draws that ranking.

One module per idea: ``chain`` (tables -> layers), ``gennet`` (GenNet's
topology files), ``frames`` (layers -> tables), ``graph`` (a model's layer
calls, carried back linearly) and ``relevance``. pandas is optional; the
functions that return DataFrames need it.
"""

from sparselayers.knowledge.chain import ChainReport, chain, check_chain
from sparselayers.knowledge.frames import layer_frame
from sparselayers.knowledge.gennet import read_topology
from sparselayers.knowledge.relevance import gradient_x_input, path_weights

__all__ = [
    "ChainReport",
    "chain",
    "check_chain",
    "gradient_x_input",
    "layer_frame",
    "path_weights",
    "read_topology",
]
