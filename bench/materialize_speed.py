"""How fast is a candidate materialized in memory, against the memory-bandwidth floor?

For each merge method, one `evolve.materialize.ResidentMerge(base, models, method)` is built
(task vectors read once into the store, the method's `prepare` run once: TSV's SVDs;
that one-off time is reported apart), then `materialize(params)` (the method's default
parameters) is timed: the median of R calls after one warm-up, alternating with the floor's
calls so that load from other processes hits both alike. The floor is the time to copy the
model's weights once, `target.copy_(source)` for every merged parameter (source: a
snapshot of the first candidate's weights, so the same bytes), also a median of R. Printed: ms per
materialize, ms per copy, and their ratio (materialize / copy; 1.0 would be the floor).

Two model families, both with 3 fine-tunes merged:
- `tiny-zoo`: the tiny zoo's base with rev, cip, srt (0.9 M parameters);
- `llama-<hidden>x<layers>`: a random transformers Llama (LlamaConfig, default hidden 512,
  8 layers, intermediate 1376, vocab 4096, untied) saved with save_pretrained, and 3 copies
  perturbed with seeded Gaussian noise (as tests/factories.py `perturbed`), written under
  bench/out/materialize_speed/ once and reused.

    .venv/bin/python bench/materialize_speed.py [--reps 5] [--hidden 512] [--layers 8]
        [--methods linear,task_arithmetic,ties,dare_linear,dare_ties,tsv] [--skip-llama]

Default: 2-4 minutes on 2 shared CPU cores (mostly TSV's SVDs in prepare), torch on
1 thread (EVOMERGE_BENCH_THREADS sets more).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import torch  # noqa: E402
from _evolve_common import OUT, load_zoo, set_threads, table  # noqa: E402
from factories import perturbed  # noqa: E402

METHODS = ["linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "tsv"]


def llama_family(root: Path, hidden: int, layers: int, vocab: int) -> tuple[Path, list[Path]]:
    from transformers import LlamaConfig, LlamaForCausalLM

    root.mkdir(parents=True, exist_ok=True)
    base = root / "base"
    if not (base / "config.json").is_file():
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 2.6875),
                          num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                          num_key_value_heads=max(1, hidden // 128), max_position_embeddings=256,
                          tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        LlamaForCausalLM(cfg).save_pretrained(base)
    fts = []
    for i in range(3):
        p = root / f"ft{i}"
        if not (p / "config.json").is_file():
            perturbed(base, p, seed=i + 1)
        fts.append(p)
    return base, fts


def interleaved_times(a, b, reps: int) -> tuple[float, float]:
    """Median seconds of a() and of b(), timed alternately after one warm-up of each, so that
    load from other processes hits both alike."""
    a(), b()
    ta, tb = [], []
    for _ in range(reps):
        for fn, ts in ((a, ta), (b, tb)):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb)


def bench_family(label: str, base: Path, fts: list[Path], methods: list[str], reps: int) -> list[list]:
    from evolve.materialize import ResidentMerge
    from merging.methods import method_params

    rows = []
    ResidentMerge(base, fts, "linear", device="cpu")  # warm-up: imports, lazy init, page cache
    for method in methods:
        t0 = time.perf_counter()
        rm = ResidentMerge(base, fts, method, device="cpu")
        setup = time.perf_counter() - t0
        params = method_params(method, {}, len(fts))
        n_params = sum(t.numel() for t in rm.targets.values())
        snapshot = rm.materialize(params).state_dict()
        snapshot = {n: snapshot[n] for n in rm.targets}

        def copy_once():
            with torch.no_grad():
                for n, t in rm.targets.items():
                    t.copy_(snapshot[n])

        t_copy, t_mat = interleaved_times(copy_once, lambda: rm.materialize(params), reps)
        rows.append([label, method, n_params, setup, t_mat * 1e3, t_copy * 1e3, t_mat / t_copy,
                     rm.cache_bytes / 2**20])
        print(f"[{label}] {method}: materialize {t_mat * 1e3:.1f} ms, copy {t_copy * 1e3:.1f} ms",
              file=sys.stderr, flush=True)
        rm = None  # free this method's cache before the next one
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--tasks", default="rev,cip,srt")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--skip-llama", action="store_true")
    ap.add_argument("--out", type=Path, default=OUT / "materialize_speed")
    args = ap.parse_args()
    set_threads()
    methods = args.methods.split(",")
    zoo, manifest = load_zoo(args.preset)
    base = zoo / manifest["models"]["base"]["path"]
    fts = [zoo / manifest["models"][t]["path"] for t in args.tasks.split(",")]
    rows = bench_family(f"{args.preset}-zoo", base, fts, methods, args.reps)
    if not args.skip_llama:
        lb, lfts = llama_family(args.out / f"llama-{args.hidden}x{args.layers}-v{args.vocab}", args.hidden,
                                args.layers, args.vocab)
        rows += bench_family(f"llama-{args.hidden}x{args.layers}", lb, lfts, methods, args.reps)
    print(f"\nResidentMerge.materialize on the CPU (torch threads: {torch.get_num_threads()}), 3 fine-tunes merged, "
          f"median of {args.reps}; floor = one target.copy_(source) per parameter\n")
    print(table(["model", "method", "params", "prepare s", "materialize ms", "copy ms", "ratio x floor",
                 "cache MiB"], rows))


if __name__ == "__main__":
    main()
