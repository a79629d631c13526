"""Command-line interface: ``equimodal train | eval | methods``."""
from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

from . import __version__
from .errors import ConfigError, EquimodalError

# flag -> config key; each flag is a shortcut for ``--set KEY=VALUE``
SHORTCUTS = {
    "dataset": "data.name", "method": "method.name", "fusion": "model.fusion", "estimator": "model.estimator",
    "epochs": "train.epochs", "batch_size": "train.batch_size", "seed": "train.seed", "device": "train.device",
    "out": "train.out", "optimizer": "optim.name", "lr": "optim.lr", "schedule": "optim.schedule",
}


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model (default: joint training on the embedded synthetic data)",
                       description="Train one run. Every config key can be set with --set section.key=value; "
                                   "the flags below are shortcuts. Output goes to --out (default runs/<timestamp>).")
    p.add_argument("--config", type=Path, help="YAML config file (overrides the defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set method.alpha=0.5 (repeatable; values are YAML)")
    p.add_argument("--dataset", help="dataset name (synthetic, synthetic3, avdigits, ...) or your own builder "
                                     "my_pkg.data:build (its options: --set data.KEY=VALUE)")
    p.add_argument("--method", help="method name (see `equimodal methods`)")
    p.add_argument("--fusion", help="concat | sum | late | film | gated")
    p.add_argument("--estimator", help="unimodal-logit estimator: auto | exact | probe | mask")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--optimizer", help="sgd | adam | adamw")
    p.add_argument("--lr", type=float)
    p.add_argument("--schedule", help="step | cosine | none")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--out", help="output folder")
    p.add_argument("--resume", type=Path, metavar="DIR", help="continue the interrupted run in DIR")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out (default: refuse)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (bars show only on a terminal anyway)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def cmd_train(args: argparse.Namespace) -> int:
    from .config import dump_config, load_config
    from .train import Trainer

    if args.resume is not None:
        if args.config or args.overrides or args.overwrite or any(getattr(args, k) is not None for k in SHORTCUTS):
            raise ConfigError("--resume takes the config of the run being resumed; drop the other options "
                              "(only --no-progress may be added)")
        trainer = Trainer.resume(args.resume)
        if args.no_progress:
            trainer.cfg["train"]["progress"] = False  # display only: the results do not depend on it
        print(f"resuming {args.resume} after epoch {trainer.epoch} of {trainer.total_epochs}")
        return _fit(trainer)
    overrides = [f"{key}={getattr(args, flag)}" for flag, key in SHORTCUTS.items() if getattr(args, flag) is not None]
    overrides += list(args.overrides)
    if args.no_progress:
        overrides.append("train.progress=false")
    cfg = load_config(args.config, overrides)
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0
    trainer = Trainer(cfg, overwrite=args.overwrite)
    trainer.check_out_dir()  # before the banner: refuse a folder that holds another run
    m = cfg["method"]
    if trainer.rank == 0:
        print(f"equimodal {__version__}: {m['name']} on {cfg['data']['name']} ({', '.join(trainer.splits.modalities)}), "
              f"fusion {cfg['model']['fusion']} / estimator {getattr(trainer.model, 'estimator', 'custom')}, device {trainer.device}"
              + (f" x {trainer.world} processes" if trainer.world > 1 else "") + f", output {trainer.out_dir}")
    code = _fit(trainer)
    if code == 0:
        from . import _dist
        del trainer  # its DDP wrappers hold the process group: let the group go with the trainer
        gc.collect()
        _dist.shutdown(wait_for_others=True)  # every rank finished the same epochs
    return code


def _fit(trainer) -> int:
    """Train; Ctrl-C ends with one line saying where to resume from."""
    try:
        trainer.fit()
    except KeyboardInterrupt:
        if trainer.rank != 0:
            return 130
        if trainer.epoch and (trainer.out_dir / "checkpoint.pt").is_file():
            print(f"\ninterrupted after epoch {trainer.epoch} of {trainer.total_epochs}; continue with "
                  f"`equimodal train --resume {trainer.out_dir}`", file=sys.stderr)
        else:
            print("\ninterrupted before the first epoch finished; nothing was saved to resume from", file=sys.stderr)
        return 130
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .data import load_dataset
    from .methods import build_method
    from .train import build_model, evaluate
    from .train.checkpoint import load_run_state
    from .train.trainer import resolve_device

    state = load_run_state(args.checkpoint)
    cfg = state["config"]
    device = resolve_device(args.device or cfg["train"]["device"])
    run_folder = args.checkpoint if args.checkpoint.is_dir() else args.checkpoint.parent
    splits = load_dataset(cfg["data"]["name"], fitted_dir=run_folder / "data",  # the run's tokenizer
                          **{k: v for k, v in cfg["data"].items() if k != "name"})
    model = build_model(cfg["model"], splits).to(device)
    best = state.get("best") or {}
    if cfg["train"]["select"] == "best_val" and best.get("model") is not None and not args.last:
        weights, epoch, which = best["model"], best["epoch"], "best validation epoch (train.select=best_val)"
    else:
        weights, epoch, which = state["model"], state["epoch"] - 1, "last trained epoch"
    model.load_state_dict(weights)
    method = build_method(**cfg["method"])
    method.load_state_dict(state["method"])
    from .train.trainer import resolve_precision
    result = evaluate(model, method, getattr(splits, args.split), device,
                      precision=resolve_precision(cfg["train"], device))
    result = {"checkpoint": str(args.checkpoint), "split": args.split, "epochs_trained": state["epoch"],
              "evaluated_epoch": epoch + 1, "evaluated": which, **result}
    print(json.dumps(result, indent=2))
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from .data.avdigits import default_source, download_avdigits, prepare_avdigits

    if args.data_command != "prepare":
        print("error: usage: equimodal data prepare NAME --out DIR ...", file=sys.stderr)
        return 2
    if args.name != "avdigits":
        return _prepare_clips(args)
    out = Path(args.out)
    if args.source:
        source = Path(args.source)
    elif args.download or args.mirror:
        source = download_avdigits(out / "raw", mirror=args.mirror, progress=not args.no_progress)
    else:
        source = default_source()
        print(f"no --source given: using {source} (set EQUIMODAL_DATA or pass --download to fetch the public files)")
    speakers = [s.strip() for s in args.test_speakers.split(",") if s.strip()]
    try:
        prepare_avdigits(source, out, split=args.split, test_speakers=speakers, pairing_seed=args.pairing_seed,
                         progress=not args.no_progress)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    manifest = json.loads((out / "manifest.json").read_text())
    print(f"AV-Digits prepared in {out}: {manifest['counts']} (split {args.split}), audio {manifest['audio_shape']}, "
          f"{len(manifest['sources'])} source files checksummed in manifest.json")
    extra = "" if args.split == "official" else f" --set data.split=speaker --set data.test_speakers=[{args.test_speakers}]"
    print(f"train on it with: equimodal train --dataset avdigits --set data.prepared={out}{extra}")
    return 0


def _prepare_clips(args: argparse.Namespace) -> int:
    from .data.avclips import PRESETS
    from .data.video import prepare_clips

    preset = PRESETS[args.name]
    if not args.videos:
        print(f"error: {args.name}: pass --videos DIR (the original videos) and --out ROOT", file=sys.stderr)
        return 2
    fps = args.fps or preset.fps
    try:
        counts = prepare_clips(args.videos, args.out, fps=fps, sample_rate=args.sample_rate or preset.sample_rate,
                               audio=not args.no_audio, skip_bad=args.skip_bad, progress=not args.no_progress)
    except (FileNotFoundError, ValueError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.name}: extracted {counts['clips']} clip(s) into {args.out} (frames at {fps} fps), "
          f"skipped {counts['skipped']}. Put train.csv/test.csv ('clip_id,label') there"
          + (" (CREMA-D falls back to the OGM-GE split lists in shared/data/crema-d)" if args.name == "cremad" else "")
          + f", then: equimodal train --dataset {args.name} --set data.root={args.out}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .analysis.bench import bench_grid, grid_specs, summarise
    from .analysis.plots import all_plots
    from .config import ConfigError, load_config

    from ._dist import is_main_process

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    out = Path(args.out)
    overrides = list(args.overrides) + (["train.stage_budget=shared"] if args.equal_epochs else [])
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        cfg = load_config(overrides=[f"data.name={args.dataset}", *overrides])
        if args.alone:
            from .data import dataset_modalities
            methods += [f"alone:{m}" for m in dataset_modalities(cfg["data"]["name"], cfg["data"])]
        tune_seeds = [int(s) for s in args.tune_seeds.split(",") if s.strip()] if args.tune_seeds else None
        if args.jobs < 1:
            raise ConfigError(f"--jobs must be >= 1, got {args.jobs}")
        if args.plan:
            grid = grid_specs(methods, cfg["optim"]["lr"], args.tune)[1]
            return _print_plan(args, grid, (tune_seeds or seeds) if args.tune else seeds, overrides)
        results = bench_grid(args.dataset, methods, seeds, out, overrides, tune=args.tune, tune_seeds=tune_seeds,
                             baseline=args.baseline, progress=not args.no_progress, jobs=args.jobs,
                             collect_only=args.collect,
                             devices=[d for d in (args.devices or "").split(",") if d] or None)
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    failures, missing = results.failures, results.missing
    if not is_main_process():  # torchrun: every rank trained; rank 0 reports
        return 1 if failures else 0
    if args.collect and missing:
        print(f"not finished yet ({len(missing)} cell(s); the tables use the others):")
        for run in missing:
            print(f"  {run.label} seed {run.seed}: {run.folder}")
    if results:
        print(summarise(results, out, baseline=args.baseline))
        for path in all_plots(results, out):
            print(f"wrote {path}")
        print(f"wrote {out / 'results.csv'} and {out / 'results.md'}")
    if failures:
        print(f"error: {len(failures)} run(s) failed (details in {out / 'failures.json'}):", file=sys.stderr)
        for f in failures:
            print(f"  {f['label']} seed {f['seed']}: {f['error']}", file=sys.stderr)
        return 1
    return 0


def _print_plan(args: argparse.Namespace, grid: list[str], seeds: list[int], overrides: list[str]) -> int:
    """One self-contained command per unfinished cell (for a job array); ``--collect`` then builds
    the tables from the run folders."""
    import shlex

    from .analysis.bench import cell_command, check_reusable, plan_grid
    from .config import load_config

    runs = plan_grid(args.dataset, grid, seeds, Path(args.out), [*overrides, "train.progress=false"])
    for run in runs:
        check_reusable(run, load_config(overrides=run.overrides))
    pending = [run for run in runs if not (run.folder / "summary.json").is_file()]
    for run in pending:
        print(shlex.join(cell_command(run)))
    print(f"# {len(pending)} of {len(runs)} cell(s) to run; then: equimodal bench ... --collect (same options)",
          file=sys.stderr)
    if args.tune and args.tune_seeds:
        print("# --tune-seeds: these are the tuning cells; after --collect, --plan again lists the picks' other seeds",
              file=sys.stderr)
    return 0


def cmd_diagnose(args: argparse.Namespace) -> int:
    from .analysis.diagnose import diagnose
    from .config import ConfigError

    overrides = list(args.overrides) + (["train.progress=false"] if args.no_progress else [])
    try:
        compare = None
        if args.compare is not None:
            from .analysis.diagnose import DEFAULT_SHORTLIST
            compare = [m.strip() for m in (args.compare or ",".join(DEFAULT_SHORTLIST)).split(",") if m.strip()]
        report = diagnose(args.dataset, args.out, [int(s) for s in args.seeds.split(",")], overrides,
                          threshold=args.threshold, compare=compare)
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report["text"])
    print(f"wrote {Path(args.out) / 'diagnosis.txt'} and {Path(args.out) / 'diagnosis.png'}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .analysis.report import build_report

    try:
        path = build_report(args.folder, args.output)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from .methods import available_methods, method_options

    methods = available_methods()
    width = max(map(len, methods))
    for name, line in methods.items():
        print(f"{name:<{width}}  {line}")
        if args.verbose:
            opts = ", ".join(f"{k}={v!r}" for k, v in method_options(name).items()) or "(no options)"
            print(f"{'':<{width}}  options: {opts}")
    print("\nEach method's rule, defaults, departures from its paper and cost: docs/methods.md (in the source "
          "distribution) and its class docstring; the API: docs/api.md.")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="equimodal", description="Balanced multimodal learning.")
    parser.add_argument("--version", action="version", version=f"equimodal {__version__}")
    sub = parser.add_subparsers(dest="command")
    _add_train(sub)
    p = sub.add_parser("eval", help="re-evaluate a saved run")
    p.add_argument("--checkpoint", type=Path, required=True, help="checkpoint.pt or a run folder")
    p.add_argument("--split", choices=("test", "val"), default="test")
    p.add_argument("--device", help="auto | cpu | cuda (default: the run's)")
    p.add_argument("--last", action="store_true",
                   help="evaluate the last epoch's weights even if the run selected its best validation epoch")
    p = sub.add_parser("data", help="prepare datasets")
    dsub = p.add_subparsers(dest="data_command")
    prep = dsub.add_parser("prepare", help="build a dataset (AV-Digits cache, or frames + audio from videos)")
    prep.add_argument("name", choices=("avdigits", "cremad", "kinetics-sounds", "vggsound", "ave"))
    prep.add_argument("--videos", help="(paper datasets) folder of original videos to extract with PyAV")
    prep.add_argument("--fps", type=int, help="(paper datasets) frames per second to extract (default: the preset's)")
    prep.add_argument("--sample-rate", type=int, help="(paper datasets) audio rate (default: the preset's)")
    prep.add_argument("--no-audio", action="store_true", help="(paper datasets) frames only; provide WAVs yourself")
    prep.add_argument("--skip-bad", action="store_true", help="(paper datasets) skip unreadable videos and count them")
    prep.add_argument("--source", help="folder laid out like shared/data (fsdd/, mnist/, mnist-train5k/)")
    prep.add_argument("--out", required=True, help="output folder for the cache and manifest.json")
    prep.add_argument("--download", action="store_true", help="fetch the public files first (needs network)")
    prep.add_argument("--mirror", help="base URL laid out like shared/data to download from instead")
    prep.add_argument("--split", choices=("official", "speaker"), default="official")
    prep.add_argument("--test-speakers", default="theo", help="comma-separated held-out speakers (--split speaker)")
    prep.add_argument("--pairing-seed", type=int, default=0)
    prep.add_argument("--no-progress", action="store_true")
    p = sub.add_parser("bench", help="run methods x seeds on a dataset; tables and plots (resumable)")
    p.add_argument("--dataset", default="synthetic", help="a dataset name or your own builder my_pkg.data:build")
    p.add_argument("--methods", default="joint,ogm-ge", help="comma-separated; options after colons: ogm-boost:mode=both")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--alone", action="store_true", help="also train each modality alone (joint on one modality)")
    p.add_argument("--baseline", default="joint", help="the row the paired differences are taken against")
    p.add_argument("--tune", action="store_true",
                   help="try each row's search space (or 4 learning rates), pick on validation, report the pick")
    p.add_argument("--tune-seeds", metavar="SEEDS",
                   help="with --tune: try the settings with these seeds only, then run each pick with every "
                        "seed (default: all of --seeds)")
    p.add_argument("--jobs", type=int, default=1, help="run this many grid cells at once (processes)")
    p.add_argument("--devices", help="with --jobs: comma-separated GPU ids, one per cell in turn (e.g. 0,1)")
    p.add_argument("--plan", action="store_true",
                   help="print one self-contained command per unfinished cell (e.g. for a SLURM job array)")
    p.add_argument("--collect", action="store_true",
                   help="run nothing: build the tables from the cells that finished, list the others")
    p.add_argument("--equal-epochs", action="store_true",
                   help="multi-stage methods share train.epochs over their stages (train.stage_budget=shared)")
    p.add_argument("--no-progress", action="store_true")
    p = sub.add_parser("diagnose", help="is my model imbalanced? each modality alone vs joint, same budget")
    p.add_argument("--dataset", default="synthetic", help="a dataset name or your own builder my_pkg.data:build; "
                                                          "your model: --set model.factory=my_pkg.models:build")
    p.add_argument("--seeds", default="0,1,2", help="3 by default: with one seed no spread is known")
    p.add_argument("--compare", nargs="?", const="", metavar="METHODS",
                   help="also compare these methods with joint at the same budget and recommend one on validation "
                        "(no value: the default shortlist)")
    p.add_argument("--out", default="diagnosis")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="model and training options, e.g. --set model.fusion=film")
    p.add_argument("--threshold", type=float, default=0.02, help="probe-accuracy gap that counts (fraction)")
    p.add_argument("--no-progress", action="store_true")
    p = sub.add_parser("report", help="a self-contained HTML page from a bench folder")
    p.add_argument("folder", type=Path)
    p.add_argument("--output", type=Path, help="default: FOLDER/report.html")
    p = sub.add_parser("methods", help="list the registered methods")
    p.add_argument("-v", "--verbose", action="store_true", help="also list each method's options")
    return parser


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "methods": cmd_methods, "data": cmd_data, "bench": cmd_bench, "diagnose": cmd_diagnose, "report": cmd_report}


def main(argv: list[str] | None = None) -> int:
    """Run one command. The library's own errors (``equimodal.errors.EquimodalError``: bad config,
    data, checkpoint, output folder, non-finite training) print one line and exit 2; anything else
    is a bug and keeps its traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return COMMANDS[args.command](args)
    except EquimodalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def console() -> int:
    """The ``equimodal`` command and ``python -m equimodal``: ``main``, then a torchrun worker ends
    at once (``equimodal._dist.exit_worker``: no interpreter teardown of the gloo backend)."""
    from . import _dist
    code = main()
    _dist.exit_worker(code)
    return code


if __name__ == "__main__":
    sys.exit(console())
