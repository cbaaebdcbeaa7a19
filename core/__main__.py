"""Command line: ``python -m core <verb> --run DIR [options]``.

    python -m core build --run checkpoints/default          every step, skipping finished ones
    python -m core data|finetune|activations|similarity|saes|features --run DIR
    python -m core report --run DIR [--json]
    python -m core analyze --run DIR --text "the acting was brilliant" [--text "..."] [--json]
    python -m core export --run DIR --out report.html       one self-contained HTML report
    python -m core figures --run DIR --out DIR [--compare RUN ...]   PNG figures (needs kaleido + Chromium)
    python -m core config --run DIR                         the resolved settings

Options go in a TOML file (``--config``; layout as ``core/presets/*.toml``) or one at a
time with ``--set section.field=value``; the shortcut flags below are the common ones.
Mistakes in input print one line ``error: ...`` and exit with code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import re
import signal
import sys
from pathlib import Path

from core.errors import LayerscopeError, user_path
from core.files import json_safe
from core.runfolder import STEPS, RunFolder

DEFAULT_RUN = Path(__file__).resolve().parent.parent / "checkpoints" / "default"

SHORTCUTS = {  # flag -> config key
    "model": "model.base",
    "dataset": "data.dataset",
    "max_rows": "data.max_rows",
    "epochs": "finetune.epochs",
    "layers": "saes.layers",
    "sae_k": "saes.k",
    "architecture": "saes.architecture",
}


def _add_config_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("configuration")
    g.add_argument("--preset", help="named preset from core/presets (default, paper, ...)")
    g.add_argument("--config", help="TOML file with options (same layout as the presets)")
    g.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="override one option (repeatable)")
    g.add_argument("--model", help="base model: all-MiniLM-L6-v2 (embedded), a hub id, or a local folder")
    g.add_argument("--dataset", help="imdb, rotten_tomatoes, clothing_reviews, bbc_news, a CSV path, or hf:NAME")
    g.add_argument("--max-rows", type=int, help="cap on dataset rows (paper: 25000)")
    g.add_argument("--epochs", type=float, help="fine-tuning epochs (paper: 10)")
    g.add_argument("--layers", help="comma-separated hidden-state indices for SAEs, e.g. 3,6,12")
    g.add_argument("--sae-k", type=int, help="TopK SAE: active latents per token")
    g.add_argument("--architecture", choices=["topk", "paper"], help="SAE architecture")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m core", description="Layerscope: what fine-tuning changed inside a transformer, layer by layer.")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")
    for step in STEPS:
        s = sub.add_parser(step, help=f"run the '{step}' step")
        s.add_argument("--run", default=str(DEFAULT_RUN), help="run folder (default: checkpoints/default)")
        s.add_argument("--force", action="store_true", help="redo the step even if it is done (later steps are then marked not done: `build` redoes them)")
        _add_config_args(s)
    b = sub.add_parser("build", help="run every step in order, skipping finished ones")
    b.add_argument("--run", default=str(DEFAULT_RUN))
    b.add_argument("--force", action="store_true", help="redo every step (with --from: redo from that step on)")
    b.add_argument("--from", dest="redo_from", choices=STEPS, help="redo this step and every later one")
    b.add_argument("--until", choices=STEPS, help="stop after this step")
    _add_config_args(b)
    r = sub.add_parser("report", help="print what a run found")
    r.add_argument("--run", default=str(DEFAULT_RUN))
    r.add_argument("--json", action="store_true", help="one JSON object (layout in README)")
    a = sub.add_parser("analyze", help="per-token analysis of a sentence, or of several compared")
    a.add_argument("--run", default=str(DEFAULT_RUN))
    a.add_argument(
        "--text",
        required=True,
        action="append",
        help="the sentence to analyse; repeat it to compare sentences (--json then prints a list; the sentence rankings rank over all of them together)",
    )
    a.add_argument("--top", type=int, default=5, help="top features per SAE (more than an SAE has: all of them)")
    a.add_argument(
        "--rank-by",
        default="variance",
        choices=["variance", "selectivity", "density", "change", "sentence", "sentence-change"],  # core.analysis.RANKINGS (not imported here: it loads torch)
        help="feature ranking: over the dataset (variance, selectivity, density, change: mean |fine-tuned - pre-trained| activation, each SAE applied to both models; from the features step) or on this sentence (sentence: variance over its tokens; sentence-change: |fine-tuned - pre-trained| summed over its tokens)",
    )
    a.add_argument("--raw", action="store_true", help="analyse the text as typed (skip the run's lowercasing/punctuation removal)")
    a.add_argument("--json", action="store_true")
    e = sub.add_parser("export", help="write the run as one self-contained HTML report")
    e.add_argument("--run", default=str(DEFAULT_RUN))
    e.add_argument("--out", required=True, help="HTML file to write")
    f = sub.add_parser("figures", help="write the run's main figures as PNG (needs kaleido + Chromium)")
    f.add_argument("--run", default=str(DEFAULT_RUN))
    f.add_argument("--out", required=True, help="folder for the PNG files")
    f.add_argument("--compare", nargs="+", default=[], metavar="RUN", help="other runs to draw beside this one in similarity_compare.png (one panel per measure, one line per run, as the paper's Figs 1-2 put its datasets)")
    c = sub.add_parser("config", help="print the resolved configuration of a run")
    c.add_argument("--run", default=str(DEFAULT_RUN))
    _add_config_args(c)
    return p


def _overrides(args) -> dict:
    from core.config import parse_set_flags

    out = {}
    for flag, key in SHORTCUTS.items():
        value = getattr(args, flag, None)
        if value is not None:
            out[key] = value
    out.update(parse_set_flags(args.set))
    return out


def _dispatch_ending_bars(args: argparse.Namespace) -> int:
    try:
        return _dispatch(args)
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt):
            _ignore_further_interrupts()
        if "tqdm" in sys.modules:  # a step may have left a bar open: end it, so the message printed next starts its own line
            from core.progress import end_bars

            end_bars()
        raise


def _refuse_non_utf8(args: argparse.Namespace) -> None:
    """Arguments whose bytes were not UTF-8 reach Python as lone surrogates (surrogateescape), which
    no tokenizer, JSON or HTML writer accepts: say so once, up front."""
    for name, value in vars(args).items():
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, str):
                try:
                    v.encode("utf-8")
                except UnicodeEncodeError:
                    fix = "pass UTF-8 text" if name in ("text", "set") else "rename the file or folder, or pass another path"
                    raise LayerscopeError(f"--{name} holds bytes that are not valid UTF-8 ({v.encode('utf-8', 'backslashreplace').decode()}); {fix}") from None


def _ignore_further_interrupts() -> None:
    """After a first Ctrl-C the command is ending: a second one (a double press) would break into
    the ending of bars and the message with a traceback. ``main`` puts the handler back."""
    with contextlib.suppress(ValueError):  # only the main thread may set handlers
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def main(argv: list[str] | None = None, restore_sigint: bool = True) -> int:
    """The CLI in this process. After a Ctrl-C, further presses are ignored until it returns; then
    the handler is put back (for callers that go on), unless ``restore_sigint`` is False: the
    command line's own entry keeps ignoring them, so a press between here and the process's exit
    cannot kill it with a signal instead of the exit status 130."""
    handler = signal.getsignal(signal.SIGINT)
    try:
        return _main(argv)
    finally:
        if restore_sigint and signal.getsignal(signal.SIGINT) is not handler:
            signal.signal(signal.SIGINT, handler)


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        _refuse_non_utf8(args)
        return _dispatch_ending_bars(args)
    except LayerscopeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.verb in ("build", *STEPS):  # the verbs that write steps
            print("interrupted: finished steps are kept; run the command again without --force or --from to resume", file=sys.stderr)
        else:  # report, analyze, export, figures, config only read the run
            print("interrupted: the run was not changed", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader left (`... | head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so exit's flush does not fail again
        return 1
    except OSError as e:
        hint = _file_system_hint(e)
        if hint is None:
            raise
        print(f"error: {hint}", file=sys.stderr)
        return 2
    except Exception as e:  # safetensors raises its own type, for disk errors too
        hint = _safetensors_hint(e)
        if hint is None:
            raise
        print(f"error: {hint}", file=sys.stderr)
        return 2
    finally:
        if "torch" in sys.modules:  # only a step can have joined a process group
            from core.pipeline import end_distributed

            end_distributed()


def _file_system_hint(e: OSError) -> str | None:
    """One line for the file-system problems a user can fix; None for the rest (a bug: traceback).

    Every file is written under a temporary name and renamed, so none of these damages what a
    run already holds.
    """
    where = e.filename or "a file"
    if isinstance(e, PermissionError):
        return f"permission denied on {where}; change its permissions, or choose a --run (or --out) path you can read and write (finished steps are kept)"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on the device while writing {where}; free some space (activations take about 11 KB per token for MiniLM, 40 KB for bert-base) and run the same command again (finished steps are kept)"
    if e.errno == errno.EROFS:
        return f"{where} is on a read-only file system; choose a --run (or --out) path on a writable one"
    if e.errno == errno.ENAMETOOLONG:
        longest = max(Path(str(where)).parts, key=len, default="")
        return f"a name in the path {where} is too long for its file system ({len(longest)} characters; most allow 255); choose a shorter --run (or --out) path"
    return None


def _safetensors_hint(e: Exception) -> str | None:
    """One line for a ``SafetensorError``: a disk error it wraps ("... (os error 28)") gets the
    file-system hint; anything else means a damaged file."""
    if type(e).__name__ != "SafetensorError":
        return None
    msg = str(e)
    code = re.search(r"os error (\d+)", msg)
    if code:
        return _file_system_hint(OSError(int(code.group(1)), msg)) or f"could not write a safetensors file ({msg}); finished steps are kept"
    return (
        f"a safetensors file in the run is damaged ({msg}); redo the step that wrote it with --force "
        "(`python -m core report --run DIR` lists the steps), or rebuild the run"
    )


def _emit(text: str, written: str = "no run file was changed") -> None:
    """Print a command's result on standard output, flushed here, so that a full disk or another
    failure behind a redirection (``> /dev/full``) is named as the output's, not as a run file's
    (``written``: what the command did write, said in that message)."""
    try:
        print(text)
        sys.stdout.flush()
    except BrokenPipeError:  # the reader left: main stops quietly
        raise
    except OSError as e:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # what is still buffered goes nowhere at exit, not into a second error
        raise LayerscopeError(f"could not write the output ({e.strerror}); check where standard output goes (a full disk behind a redirection?) and run the command again ({written})") from None


def _dispatch(args) -> int:
    from core import pipeline

    if not str(args.run).strip():  # "" would mean the working directory
        raise LayerscopeError('--run is empty; pass a run folder (is the variable in --run "$RUN" set?)')
    run = RunFolder(args.run)
    run.refuse_file()
    if args.verb == "report":
        from core.report import build_report, format_report

        rep = build_report(run)
        _emit(json.dumps(json_safe(rep), indent=2) if args.json else format_report(rep))
        if run.held_elsewhere():  # on stderr: the JSON on stdout stays as documented
            print(f"note: a build is running in {run.root} now; steps it has not finished are missing or from before it", file=sys.stderr)
        return 0
    if args.verb == "analyze":
        from core.analysis import analyze_text, analyze_texts, format_analysis, load_bundle

        from core.report import missing_saes

        if len(args.text) == 1:  # one object, the layout documented since the first version
            result = analyze_text(load_bundle(run), args.text[0], top=args.top, rank_by=args.rank_by, clean=not args.raw)
            _emit(json.dumps(json_safe(result), indent=2) if args.json else format_analysis(result))
        else:
            results = analyze_texts(load_bundle(run), args.text, top=args.top, rank_by=args.rank_by, clean=not args.raw)
            shown = [f"=== sentence {i} of {len(results)} ===\n{format_analysis(r)}" for i, r in enumerate(results, 1)]
            _emit(json.dumps(json_safe(results), indent=2) if args.json else "\n\n".join(shown))
        missing = missing_saes(run)
        if missing:  # on stderr: the JSON on stdout stays as documented
            print(f"note: {missing}; the SAEs above are the others", file=sys.stderr)
        return 0
    if args.verb == "export":
        from core.export import export_html, is_report
        from core.files import write_text

        if not args.out.strip():  # "" or " ": a file named by blanks, or the working directory
            raise LayerscopeError("--out is empty; pass a file name for the report, e.g. --out report.html (nothing was written)")
        out = user_path(args.out)
        if args.out.endswith(("/", os.sep)) and not out.is_dir():  # Path() drops the slash: a file named like the folder
            raise LayerscopeError(f"--out {args.out} names a folder; pass a file name for the report, e.g. {out / 'report.html'}")
        # an earlier report may be replaced; any other file (a run's manifest.json, a CSV, one's own page) would be lost
        if out.is_file() and not is_report(out):
            owner = next((p for p in out.resolve().parents if (p / "manifest.json").is_file()), None)
            if owner is not None:
                raise LayerscopeError(f"--out {out} is a file of the run {owner}; write the report to a new file or outside the run folder (nothing was written)")
            raise LayerscopeError(f"--out {out} is a file that is not a Layerscope report; pass a new file name, or delete that file first (nothing was written)")
        # (a folder, the run's own included, gets write_text's "is a folder; pass a file name")
        write_text(out, export_html(run))
        _emit(f"wrote {out}", written=f"the report was written to {out}")
        return 0
    if args.verb == "figures":
        from core.export import write_figures

        if not str(args.out).strip():  # "" would mean the working directory
            raise LayerscopeError('--out is empty; pass a folder for the PNG files, e.g. --out figs/ (nothing was written)')
        if any(not r.strip() for r in args.compare):  # "" would mean the working directory
            raise LayerscopeError('--compare has an empty entry; pass run folders (is the variable in --compare "$RUN" set?) (nothing was written)')

        out = user_path(args.out)
        _emit("\n".join(f"wrote {p}" for p in write_figures(run, out, compare=[RunFolder(r) for r in args.compare])), written=f"the figures were written to {out}")
        return 0
    cfg = pipeline.resolve_run_config(run, args.preset, args.config, _overrides(args))
    if args.verb == "config":
        _emit(pipeline.describe_config(cfg))
        return 0
    # one writing process per run folder (under torchrun, rank 0 holds it for all ranks)
    with run.writing() if pipeline.is_main_process() else contextlib.nullcontext():
        if args.verb == "build":
            timings = pipeline.build(run, cfg, force=args.force, redo_from=args.redo_from or (STEPS[0] if args.force else None), until=args.until)
            if timings and pipeline.is_main_process():
                print("built: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + f"; total {sum(timings.values()):.0f} s")
            return 0
        pipeline.run_step(run, args.verb, cfg, force=args.force, redo=args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main(restore_sigint=False))
