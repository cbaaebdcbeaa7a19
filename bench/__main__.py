"""``python -m bench``: run Layerscope's benchmarks, print a table, write results.json.

    python -m bench                              every benchmark, full size (about 35 minutes on 2 cores)
    python -m bench --quick                      a smoke run on tiny inputs (what tests/test_bench.py runs)
    python -m bench --only extraction,analysis   some of them (the others stay as they are in results.json)
    python -m bench --out /tmp/x/results.json    write elsewhere (growth plots go next to it)

Benchmarks: extraction, sae_training, finetune, finetune_accuracy, analysis, dashboard, memory,
growth (one module each in bench/). Every figure is compared with a baseline measured in the same process run; the table
shows value, baseline, ratio, target and pass/fail, and results.json keeps every raw timing
together with the thread count, torch version and CPU model.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
import traceback
from pathlib import Path

from bench.common import ROOT, SECTIONS, Context, Results, Section, set_threads


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny inputs, a few seconds per benchmark (smoke test; figures are not meaningful)")
    p.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(SECTIONS)}")
    p.add_argument("--out", default=str(ROOT / "bench" / "results.json"), help="where to write results.json (default: bench/results.json)")
    p.add_argument("--threads", type=int, default=2, help="torch threads for every timing (default 2)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement after the warm-up (default 3; 1 with --quick)")
    p.add_argument("--growth-sizes", default="", help="growth sizes in million tokens, e.g. 0.1,0.5,1,2 (default 0.1,0.5,1)")
    p.add_argument("--work", default="", help="scratch folder (default bench/_work; reused between runs)")
    return p.parse_args(argv)


def check_numbers(args: argparse.Namespace) -> str | None:
    """What is wrong with --threads, --repeats or --growth-sizes (checked before any benchmark runs); None if nothing."""
    if args.threads < 1:
        return f"--threads {args.threads}: use at least 1 thread"
    if args.repeats is not None and args.repeats < 1:
        return f"--repeats {args.repeats}: time each measurement at least once (default 3)"
    for s in (s for s in args.growth_sizes.split(",") if s.strip()):
        try:
            ok = float(s) > 0
        except ValueError:
            ok = False
        if not ok or s.strip().lower() in ("inf", "infinity"):
            return f"--growth-sizes has {s!r}; give positive numbers of million tokens, e.g. 0.1,0.5,1"
    return check_paths(args)


def check_paths(args: argparse.Namespace) -> str | None:
    """What is wrong with --out or --work (checked before any benchmark runs, which takes minutes);
    creates the folders they need. None if nothing."""
    from core.errors import LayerscopeError
    from core.files import make_folder

    out = Path(args.out)
    if out.is_dir():
        return f"--out {out} is not a file; give the path of the results file, e.g. {out / 'results.json'}"
    if out.exists() and not out.is_file():
        return f"--out {out} is not a regular file; give the path of a .json file"
    try:
        make_folder(out.parent)
        if args.work:
            make_folder(Path(args.work))
    except LayerscopeError as e:
        return str(e)
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    if args.only and not only:
        print(f"error: --only {args.only!r} names no benchmark; pass some of {', '.join(SECTIONS)}, or drop --only to run them all", file=sys.stderr)
        return 2
    only = only or list(SECTIONS)
    unknown = [s for s in only if s not in SECTIONS]
    if unknown:
        print(f"error: unknown benchmark {', '.join(unknown)}; choose from {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    problem = check_numbers(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    os.environ["TQDM_DISABLE"] = "1"  # progress bars of core's loops would flood the output
    set_threads(args.threads)
    ctx = Context(quick=args.quick, threads=args.threads, repeats=args.repeats if args.repeats is not None else (1 if args.quick else 3))
    if args.work:
        ctx.work = Path(args.work).resolve()
    ctx.work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    results = Results(ctx, "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:]))
    merge = set(only) != set(SECTIONS)  # a partial run updates its sections of an existing results.json
    t_all = time.perf_counter()
    failed = []
    for name in only:
        ctx.log(f"== {name} ...")
        load_before = os.getloadavg()[0]
        t0 = time.perf_counter()
        module = importlib.import_module(f"bench.{name}")
        try:
            if name == "growth":
                sizes = tuple(float(s) for s in args.growth_sizes.split(",") if s) or None
                section = module.run(ctx, sizes=sizes, plot_dir=out.parent)
            else:
                section = module.run(ctx)
        except Exception as e:  # noqa: BLE001 - one broken benchmark must not hide the others
            traceback.print_exc()
            section = Section(name, (module.__doc__ or "").split("\n\n")[0])
            section.notes.append(f"failed: {type(e).__name__}: {e}")
            failed.append(name)
        section.seconds = time.perf_counter() - t0
        section.load_average = [round(load_before, 2), round(os.getloadavg()[0], 2)]
        results.add(section)
        results.write(out, merge=merge)  # after every benchmark, so a long run leaves partial results
        ctx.log(f"== {name} done in {section.seconds:.0f} s")
    results.meta["seconds"] = time.perf_counter() - t_all
    results.write(out, merge=merge)
    print()
    print(results.table())
    for s in results.sections.values():
        for n in s.notes:
            print(f"note [{s.name}]: {n}")
    print(f"\n{results.meta['threads']} threads, torch {results.meta['torch']}, CPU {results.meta['cpu']}; written to {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
