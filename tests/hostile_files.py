"""Hostile files for tests/test_hostile.py, built in the process that loads them.

Each maker writes its file under ``folder`` and returns ``(path, load)``. The
payloads are compressed in chunks so that making them stays small: the test
measures the memory the load takes, not the making.
"""

from __future__ import annotations

import base64
import json
import zipfile
import zlib
from typing import Any, Callable

import h5py
import keras

import sparselayers as sl

CHUNK = 2**20


def bomb(unit: bytes, total: int, prefix: bytes = b"") -> bytes:
    """zlib of ``prefix + unit * (total // len(unit))``, compressed chunk by chunk."""
    deflater = zlib.compressobj(9)
    parts = [deflater.compress(prefix)]
    count = total // len(unit)
    per_block = CHUNK // len(unit)
    for start in range(0, count, per_block):
        parts.append(deflater.compress(unit * min(per_block, count - start)))
    return b"".join(parts) + deflater.flush()


def _replace_pattern(path: str, config: dict[str, Any]) -> None:
    """Writes ``config`` as the pattern dataset of the only SparseDense in a weights file."""
    blob = json.dumps(config).encode()
    with h5py.File(path, "r+") as f:
        keys = []
        f.visit(lambda name: keys.append(name) if name.endswith("/pattern") else None)
        (key,) = keys
        del f[key]
        f.create_dataset(key, data=list(blob), dtype="uint8")


def _weights_file(folder: str, shape: tuple[int, int], config: dict[str, Any]) -> tuple[str, Callable]:
    pattern = sl.SparsityPattern.from_coo([k // shape[1] for k in range(20)], [k % shape[1] for k in range(20)], shape)
    model = keras.Sequential([keras.Input((shape[0],)), sl.SparseDense(pattern, name="s")])
    path = f"{folder}/hostile.weights.h5"
    model.save_weights(path)
    _replace_pattern(path, config)
    return path, model.load_weights


def _gaps_of_ones(shape: tuple[int, int], nnz: int) -> dict[str, Any]:
    return {"shape": list(shape), "nnz": nnz, "gap_dtype": "uint8",
            "gaps": base64.b64encode(bomb(b"\x01", nnz - 1, prefix=b"\x00")).decode()}  # a valid dense pattern


def weights_file_declaring_1e8_entries(folder: str) -> tuple[str, Callable]:
    """A ~140 KB .weights.h5 whose pattern declares 10^8 entries of another shape than the layer's."""
    return _weights_file(folder, (12, 8), _gaps_of_ones((10_000, 10_000), 10**8))


def weights_file_declaring_1e8_entries_of_the_layers_shape(folder: str) -> tuple[str, Callable]:
    """The same, for a layer of that shape holding 20 entries."""
    return _weights_file(folder, (10_000, 10_000), _gaps_of_ones((10_000, 10_000), 10**8))


def keras_file_with_a_names_bomb(folder: str) -> tuple[str, Callable]:
    """A .keras whose layer config names 10^8 inputs in ~1 MB of zlib (1 GB of JSON)."""
    model = keras.Sequential([keras.Input((3,)), sl.SparseDense(sl.patterns.banded((3, 2)), name="s")])
    path = f"{folder}/hostile.keras"
    model.save(path)
    with zipfile.ZipFile(path) as archive:
        files = {name: archive.read(name) for name in archive.namelist()}
    config = json.loads(files["config.json"])
    (layer,) = [c for c in config["config"]["layers"] if c["class_name"] == "SparseDense"]
    names = bomb(b'"a",', 2**30, prefix=b"[")
    layer["config"]["pattern"] = {
        "shape": [10**8, 2], "nnz": 0, "gap_dtype": "uint8", "gaps": base64.b64encode(zlib.compress(b"")).decode(),
        "input_names": base64.b64encode(names).decode(),
    }
    files["config.json"] = json.dumps(config).encode()
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return path, keras.models.load_model
