"""Genomics scale: named SNPs -> genes -> pathways -> 1 output, from mapping tables.

    python benchmarks/genomics.py                   # 1,000,000 SNPs, 20,000 genes, 300 pathways
    python benchmarks/genomics.py --snps 100000     # a quick look

Times, with the process's peak resident memory after each phase:

* ``SparsityPattern.from_edges`` on the SNP -> gene table given as Python
  lists of str (the budget is 20 s for a million SNPs);
* ``sl.knowledge.chain`` building the layers from both tables;
* training at batch 32 on int8 genotypes streamed by ``tf.data`` from a
  ``np.memmap`` (the budget is 5 s a step; the file is never loaded whole and
  never converted to float as a whole: ``SparseDense`` casts each batch);
* ``.keras`` save and load (names included), and the size of the names in
  the config;
* both relevance measures of ``sl.knowledge``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
import zipfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import sparselayers as sl  # noqa: E402


def peak_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def tables(n_snps: int, n_genes: int, n_pathways: int, seed: int = 0):
    """SNP -> gene and gene -> pathway tables as Python lists of str, like a parsed annotation file.

    SNPs lie in genomic order; each gene covers a run of consecutive SNPs and
    one SNP in ten also falls in the next gene (overlapping genes). Each gene
    belongs to one to three pathways.
    """
    rng = np.random.default_rng(seed)
    snp_ids = rng.choice(10 * n_snps, n_snps, replace=False) + 1
    snps = [f"rs{k}" for k in snp_ids.tolist()]
    genes = [f"GENE{k}" for k in range(n_genes)]
    gene_of = np.sort(rng.integers(0, n_genes, n_snps))
    gene_of[:n_genes] = np.arange(n_genes)  # every gene has SNPs
    gene_of.sort()
    overlap = np.flatnonzero((rng.random(n_snps) < 0.1) & (gene_of < n_genes - 1))
    snp_column = snps + [snps[k] for k in overlap.tolist()]
    gene_column = [genes[g] for g in gene_of.tolist()] + [genes[g + 1] for g in gene_of[overlap].tolist()]
    per_gene = rng.integers(1, 4, n_genes)
    gene_pathway = [genes[g] for g in np.repeat(np.arange(n_genes), per_gene).tolist()]
    pathway_column = [f"PATHWAY{k}" for k in rng.integers(0, n_pathways, per_gene.sum()).tolist()]
    return snps, (snp_column, gene_column), (gene_pathway, pathway_column)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--snps", type=int, default=1_000_000)
    parser.add_argument("--genes", type=int, default=20_000)
    parser.add_argument("--pathways", type=int, default=300)
    parser.add_argument("--samples", type=int, default=512, help="rows of the int8 genotype file")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5, help="timed training steps")
    args = parser.parse_args()
    print(f"{cpu_model()}, {os.cpu_count()} CPUs, TensorFlow {tf.__version__}, Keras {keras.__version__}")
    print(f"{args.snps:,} SNPs -> {args.genes:,} genes -> {args.pathways} pathways -> 1 output, batch {args.batch}")

    def phase(name, fn):
        start = time.perf_counter()
        result = fn()
        print(f"{name:<44} {time.perf_counter() - start:8.2f} s   peak RSS {peak_mib():8.0f} MiB", flush=True)
        return result

    snps, snp_gene, gene_pathway = phase("tables as Python str lists", lambda: tables(args.snps, args.genes, args.pathways))
    print(f"  SNP -> gene rows: {len(snp_gene[0]):,}; gene -> pathway rows: {len(gene_pathway[0]):,}")
    pattern = phase("from_edges(SNP -> gene, inputs=snps)", lambda: sl.SparsityPattern.from_edges(*snp_gene, inputs=snps))
    print(f"  {pattern!r}")
    layers = phase(
        "knowledge.chain(both tables)",
        lambda: sl.knowledge.chain([pattern, gene_pathway], inputs=snps, names=["genes", "pathways"]),
    )
    inputs = keras.Input((args.snps,), dtype="int8")
    hidden = inputs
    for layer in layers:
        hidden = layer(hidden)
    model = keras.Model(inputs, keras.layers.Dense(1, name="phenotype")(hidden))
    model.compile(optimizer="adam", loss="mse")
    print(f"  kernels {[layer.kernel_name for layer in layers]}, trainable params {model.count_params():,}")

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "genotypes.int8")

        def write_genotypes():
            genotypes = np.memmap(path, dtype=np.int8, mode="w+", shape=(args.samples, args.snps))
            rng = np.random.default_rng(1)
            for start in range(0, args.samples, 64):
                genotypes[start : start + 64] = rng.integers(0, 3, (min(64, args.samples - start), args.snps), np.int8)
            genotypes.flush()

        phase(f"write {args.samples} x {args.snps:,} int8 genotypes", write_genotypes)
        genotypes = np.memmap(path, dtype=np.int8, mode="r", shape=(args.samples, args.snps))
        phenotype = np.random.default_rng(2).normal(size=(args.samples, 1)).astype("float32")
        batches = args.samples // args.batch

        def read(k):
            k = int(k)
            rows = slice(k * args.batch, (k + 1) * args.batch)
            return np.asarray(genotypes[rows]), phenotype[rows]

        def load_batch(k):
            x, y = tf.numpy_function(read, [k], (tf.int8, tf.float32))
            x.set_shape((args.batch, args.snps))
            y.set_shape((args.batch, 1))
            return x, y

        dataset = tf.data.Dataset.range(batches).repeat().map(load_batch).prefetch(1)
        phase("first training step (traces)", lambda: model.fit(dataset, steps_per_epoch=1, epochs=1, verbose=0, shuffle=False))
        start = time.perf_counter()
        model.fit(dataset, steps_per_epoch=args.steps, epochs=1, verbose=0, shuffle=False)
        step = (time.perf_counter() - start) / args.steps
        print(f"{'training step, batch ' + str(args.batch) + ' (mean of ' + str(args.steps) + ')':<44} {step:8.2f} s   peak RSS {peak_mib():8.0f} MiB")

        file = os.path.join(tmp, "genomics.keras")
        phase("save .keras", lambda: model.save(file))
        with zipfile.ZipFile(file) as archive:
            config = json.loads(archive.read("config.json"))
            sizes = {info.filename: info.file_size for info in archive.infolist()}
        pattern_config = next(
            layer["config"]["pattern"] for layer in config["config"]["layers"] if layer["config"]["name"] == "genes"
        )
        print(
            f"  file {os.path.getsize(file) / 2**20:.1f} MiB; config.json {sizes['config.json'] / 2**20:.1f} MiB, "
            f"of which {args.snps:,} SNP names {len(pattern_config['input_names']) / 2**20:.2f} MiB "
            f"({len(pattern_config['input_names']) / args.snps:.1f} bytes a name; as a JSON list "
            f"{len(json.dumps(snps)) / 2**20:.1f} MiB)"
        )
        loaded = phase("load .keras", lambda: keras.saving.load_model(file))
        assert loaded.get_layer("genes").pattern.input_names == tuple(snps)
        x = np.asarray(genotypes[: args.batch])
        np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5, atol=1e-5)

        phase("path_weights(level=0), SNPs", lambda: sl.knowledge.path_weights(model))
        top = phase("path_weights(level=1), genes", lambda: sl.knowledge.path_weights(model, level=1))
        print(f"  top genes: {top.unit.head(3).tolist()}")
        phase(
            f"gradient_x_input(level=0) over {2 * args.batch} samples",
            lambda: sl.knowledge.gradient_x_input(model, genotypes[: 2 * args.batch], batch_size=args.batch),
        )
    print(f"peak RSS {peak_mib() / 1024:.2f} GiB")


if __name__ == "__main__":
    main()
