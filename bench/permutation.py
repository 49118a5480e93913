"""Permutation merging on the digits family: naive averaging, pairwise weight matching, C2M3.

    OMP_NUM_THREADS=1 python bench/permutation.py [--out bench/out/permutation.json]

For N in {2, 3, 5} independently trained digits MLPs and CNNs (zoo/digits.py, seeds 0..N-1):
test loss and accuracy of each merge with and without REPAIR (512 training images), the
cycle error of pairwise matching (share of units that P_ab P_bc P_ca does not return to
themselves, models 0, 1, 2; C2M3's is 0 by construction and is checked), and alignment
time, C2M3's chosen start (init="auto", see merging/permutation/c2m3.py). If the `rebasin`
package (PyPI, `pip install .[bench]`) imports, its weight matching aligns the same models to
model 0 in the same run and its averaged model is scored next to ours (loss, accuracy and
time as ratios rebasin / ours); otherwise its row says "not installed".
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from merging.permutation.c2m3 import c2m3, merge_in_universe
from merging.permutation.repair import repair
from merging.permutation.spec import identity_perms, permute_state, spec_from_module
from merging.permutation.weight_matching import cycle_error, relative, weight_matching
from zoo import digits

CACHE = Path(__file__).resolve().parents[1] / ".cache" / "permutation-digits"


def run(kind: str, n: int, batches) -> list[dict]:
    models = [digits.load_model(f) for f in digits.build_family(CACHE, kind, list(range(n)))]
    spec = spec_from_module(models[0])
    st = [m.state_dict() for m in models]
    rows = []
    t0 = time.perf_counter()
    wm = [identity_perms(spec)] + [weight_matching(spec, st[0], s) for s in st[1:]]
    t_wm = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = c2m3(spec, st)
    t_c = time.perf_counter() - t0
    cyc_wm = cyc_c = None
    if n >= 3:
        p = {(a, b): weight_matching(spec, st[a], st[b]) for a, b in ((0, 1), (1, 2), (2, 0))}
        cyc_wm = cycle_error(p[0, 1], p[1, 2], p[2, 0])
        cyc_c = cycle_error(*(relative(res.perms[a], res.perms[b]) for a, b in ((0, 1), (1, 2), (2, 0))))
    for name, perms, secs, cyc in (("naive", [identity_perms(spec)] * n, 0.0, None), ("weight_matching", wm, t_wm, cyc_wm),
                                   ("c2m3", res.perms, t_c, cyc_c)):
        merged = digits.model_from_state(kind, merge_in_universe(spec, st, perms))
        loss, acc = digits.evaluate(merged)
        ends = [digits.model_from_state(kind, permute_state(spec, s, p)) for s, p in zip(st, perms)]
        repair(merged, ends, spec.repair_layers, batches)
        rloss, racc = digits.evaluate(merged)
        rows.append({"kind": kind, "n": n, "method": name, "loss": loss, "acc": acc, "repair_loss": rloss,
                     "repair_acc": racc, "cycle_error": cyc, "seconds": secs,
                     "iterations": res.iterations if name == "c2m3" else None,
                     "init": res.init if name == "c2m3" else None})
    ends = [digits.evaluate(m) for m in models]
    rows.append({"kind": kind, "n": n, "method": "endpoints (mean)", "loss": sum(e[0] for e in ends) / n,
                 "acc": sum(e[1] for e in ends) / n})
    rows.extend(rebasin_rows(kind, n, models, next(r for r in rows if r['method'] == 'weight_matching')))
    return rows


def rebasin_rows(kind, n, models, ours: dict) -> list[dict]:
    """rebasin's weight matching (PermutationCoordinateDescent, default 100 iterations) of
    models 1..N-1 onto model 0, then the plain average, as in our `weight_matching` row.

    rebasin traces the module with torchview and permutes model B in place; its random group
    order comes from torch's global generator (seeded here). `preserved` is max |f_B - f_B'|
    on the test split: whether rebasin's permutation left model B's function unchanged.
    """
    try:
        import copy

        from rebasin import PermutationCoordinateDescent
    except ImportError:
        return [{"kind": kind, "n": n, "method": "rebasin (PyPI)", "note": "not installed (pip install .[bench])"}]
    _, _, xte, _ = digits.digits_data()
    torch.manual_seed(0)
    aligned, secs, preserved = [models[0]], 0.0, 0.0
    for m in models[1:]:
        b = copy.deepcopy(m)
        t0 = time.perf_counter()
        PermutationCoordinateDescent(models[0], b, xte[:1]).rebasin()
        secs += time.perf_counter() - t0
        with torch.no_grad():
            preserved = max(preserved, float((m(xte) - b(xte)).abs().max()))
        aligned.append(b)
    st = [a.state_dict() for a in aligned]
    avg = {k: sum(s[k] for s in st) / n for k in st[0]}
    loss, acc = digits.evaluate(digits.model_from_state(kind, avg))
    return [{"kind": kind, "n": n, "method": "rebasin (PyPI)", "loss": loss, "acc": acc, "seconds": secs,
             "function_change": preserved, "loss_ratio": loss / ours["loss"], "acc_ratio": acc / ours["acc"],
             "time_ratio": secs / max(ours["seconds"], 1e-9)}]


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/out/permutation.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    xtr, _, _, _ = digits.digits_data()
    batches = [xtr[i:i + 128] for i in range(0, 512, 128)]
    rows = [r for kind in ("mlp", "cnn") for n in (2, 3, 5) for r in run(kind, n, batches)]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))
    print("| model | N | method | loss | acc | loss +REPAIR | acc +REPAIR | cycle error | align s | C2M3 start |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if "note" in r:
            print(f"| {r['kind']} | {r['n']} | {r['method']} | {r['note']} | | | | | | |")
            continue
        print(f"| {r['kind']} | {r['n']} | {r['method']} | {r['loss']:.3f} | {r['acc']:.3f} | "
              f"{fmt(r.get('repair_loss'), '.3f')} | {fmt(r.get('repair_acc'), '.3f')} | "
              f"{fmt(r.get('cycle_error'), '.2f')} | {fmt(r.get('seconds'), '.2f')} | {r.get('init') or '-'} |")
    print("\nrebasin (PyPI) against our weight_matching, same models, same run (ratios rebasin / ours):")
    print("| model | N | loss ratio | acc ratio | time ratio | max change of B's outputs |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if r["method"] == "rebasin (PyPI)" and "note" not in r:
            print(f"| {r['kind']} | {r['n']} | {r['loss_ratio']:.2f} | {r['acc_ratio']:.2f} | {r['time_ratio']:.1f} | "
                  f"{r['function_change']:.2g} |")


if __name__ == "__main__":
    main()
