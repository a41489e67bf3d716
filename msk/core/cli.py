"""The ``msk`` command line: one typer command per pipeline step, each with an example.

Commands import their pipeline lazily so that ``msk --help`` stays fast.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from msk.core.errors import MskError
from msk.core.hookspecs import COMPONENT_KINDS

app = typer.Typer(
    name="msk",
    help="Turn an archive of musculoskeletal radiographs into diagnostic tools, on Ray.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
console = Console(stderr=True)
out = Console()


@app.callback()
def _global_options(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="show Ray's own output (start-up, Ray Train and "
                                 "library logs, Ray's actors), quiet by default; env MSK_VERBOSE=1 does the same"),
) -> None:
    """Turn an archive of musculoskeletal radiographs into diagnostic tools, on Ray."""
    if verbose:
        from msk.core.runtime.ray_start import set_verbose

        set_verbose(True)


CONFIG_HELP = "YAML file with options (relative paths in it are read from its folder); command-line options override it."
PROFILE_HELP = ("sizes and epochs for this machine, for the options you leave unset: cpu, gpu or auto (gpu when "
                "torch sees CUDA); table in docs/profiles.md")

#: Options many commands share, declared once (typer reads the Annotated metadata).
ConfigFile = Annotated[Optional[Path], typer.Option("--config", "-c", help=CONFIG_HELP)]
Profile = Annotated[str, typer.Option("--profile", envvar="MSK_PROFILE", help=PROFILE_HELP)]
UseGpu = Annotated[Optional[bool], typer.Option("--use-gpu/--no-gpu", help="one GPU per worker")]


def _profiled(cfg, task: str, profile: str | None, run_dir: Path | None = None):
    """``cfg`` with the machine profile's values for its unset options (msk.core.profiles), said on stderr."""
    from msk.core.profiles import apply_profile

    cfg, done = apply_profile(cfg, task, profile, run_dir=run_dir)
    console.print(done.line(), soft_wrap=True, highlight=False)
    return cfg


def locks_run(param: str):
    """Decorator: the command holds the run lock (msk.core.runtime.runlock) of its folder argument
    ``param`` while it runs; a second run on that folder stops at once naming the holder.
    ``MSK_FORCE_UNLOCK=1`` takes over a lock another host recorded."""
    import functools
    import os

    def decorate(command):
        @functools.wraps(command)
        def locked(*args, **kwargs):
            try:  # typer 0.29 runs commands on its own copy of click (typer._click)
                from typer._click.globals import get_current_context
            except ImportError:
                from click import get_current_context

            from msk.core.runtime.runlock import run_lock

            folder = kwargs.get(param)
            if folder is None:
                return command(*args, **kwargs)
            ctx = get_current_context(silent=True)  # "msk train sorter", recorded in the lock and FAILED
            with run_lock(folder, ctx.command_path if ctx else None,
                          force=os.environ.get("MSK_FORCE_UNLOCK", "") not in ("", "0")):
                return command(*args, **kwargs)
        return locked
    return decorate


@app.command()
def plugins(
    kind: Optional[str] = typer.Argument(None, help=f"one of {', '.join(k.name for k in COMPONENT_KINDS)} "
                                        "\\[default: all]"),
    pattern: str = typer.Option("*", "--pattern", "-p", help="shell wildcard on names, e.g. 'resnet*'"),
) -> None:
    """List registered components (built-in and third-party) and where they come from.

    [b]Example[/b]: [cyan]msk plugins encoder -p 'resnet*'[/cyan]
    """
    from rich.table import Table

    from msk.core.registry import KINDS, get_registry

    reg = get_registry()
    for k in [kind] if kind else list(KINDS):
        entries = reg.entries(k, pattern)
        if kind is None and not entries:
            continue
        table = Table(title=f"{k} ({len(entries)})", title_justify="left", expand=False)
        table.add_column("name", no_wrap=True, style="cyan")
        table.add_column("description")
        table.add_column("from", no_wrap=True)
        for entry in entries:
            spec = entry.spec
            desc = spec.description
            if k == "entity_set":
                desc = f"{desc} [{len(spec)} {spec.kind}s]"
            elif k == "dataset":
                desc = f"{desc}; options: {', '.join(spec.options.model_fields)}"
            elif k == "tuning_task":
                desc = f"{desc}; best config for `{spec.command}`"
            elif spec.is_family:
                desc = f"{desc} [e.g. {spec.example_name}]"
            table.add_row(entry.name, desc, f"{entry.origin}\n[dim]{entry.plugin}[/dim]")
        out.print(table)


@app.command()
@locks_run("out_dir")
def synth(
    out_dir: Path = typer.Argument(..., metavar="OUT", help="folder to write the export into"),
    n: Optional[int] = typer.Option(None, "--n", help="number of files \\[default: 2000]"),
    seed: Optional[int] = typer.Option(None, help="random seed \\[default: 0]"),
    workers: Optional[int] = typer.Option(None, help="parallel processes \\[default: 1]"),
    style: Optional[str] = typer.Option(None, help="'radiograph' (realistic framing and exposure) or "
                                        "'basic' (the original phantoms) \\[default: radiograph]"),
    image_size: Optional[int] = typer.Option(None, help="long side of the images in px \\[default: 320]"),
    config: ConfigFile = None,
) -> None:
    """Write a deterministic synthetic PACS export (DICOM files + ground_truth.csv).

    28 anatomical regions, 10 tumour entities, CR/DX in several transfer syntaxes, fake PHI and
    a few deliberately corrupt files: msk's embedded default data.

    [b]Example[/b]: [cyan]msk synth out/export --n 500 --seed 1[/cyan]
    """
    from msk.core.config import load_config
    from msk.core.synth import SynthConfig, synthesize

    cfg = load_config(SynthConfig, config, n_images=n, seed=seed, workers=workers, style=style,
                      image_size=image_size)
    report = synthesize(out_dir, cfg)
    out.print(f"wrote {report.n_files} files ({report.n_corrupt} deliberately corrupt, "
              f"{report.n_lesions} with a lesion) in {report.seconds:.1f} s")
    out.print(f"export:       {report.out / 'export'}")
    out.print(f"ground truth: {report.ground_truth}")


@app.command()
@locks_run("out_dir")
def ingest(
    src: Path = typer.Argument(..., help="folder tree of DICOM/PNG/JPEG/BMP/TIFF files"),
    out_dir: Path = typer.Argument(..., metavar="OUT", help="output folder (shards, manifest)"),
    image_size: Optional[int] = typer.Option(None, help="output side length in px \\[default: 256]"),
    key_file: Optional[Path] = typer.Option(None, help="pseudonymisation key file (env MSK_PSEUDONYM_KEY wins)"),
    modality: Optional[str] = typer.Option(
        None, "--modality", help="keep only these DICOM modalities, comma-separated (e.g. CR,DX); "
        "add 'none' to keep files without one (PNG/JPEG/BMP/TIFF); others are quarantined excluded_modality "
        "\\[default: keep all]"),
    pixel_scrub: Optional[str] = typer.Option(
        None, "--pixel-scrub", help="blank burned-in text: auto (BurnedInAnnotation YES or text "
        "detected), always or off \\[default: auto]"),
    scrub_detector: Optional[str] = typer.Option(
        None, "--scrub-detector", help="what finds burned-in text: learned (a small network shipped with msk) "
        "or morphology (classical) \\[default: learned]"),
    config: ConfigFile = None,
) -> None:
    """Ingest DICOM/PNG/JPEG/BMP/TIFF into sharded Parquet with Ray Data; every input is accounted for.

    Headers are pseudonymised before anything is written. Re-running is idempotent and an
    interrupted run resumes. Connects to a running cluster when RAY_ADDRESS is set. The summary
    says what was kept (per modality) and flagged (warnings such as colour_image).

    [b]Example[/b]: [cyan]MSK_PSEUDONYM_KEY=... msk ingest /pacs/export out/ingest --image-size 256 --modality CR,DX[/cyan]
    """
    from msk.core.config import load_config
    from msk.core.stages.ingest.pipeline import IngestConfig
    from msk.core.stages.ingest.pipeline import ingest as run_ingest

    if not src.is_dir():
        raise MskError(f"source folder {src} does not exist")
    cfg = load_config(IngestConfig, config, image_size=image_size, key_file=key_file,
                      modalities=modality.split(",") if modality is not None else None, pixel_scrub=pixel_scrub,
                      scrub_detector=scrub_detector)
    report = run_ingest(src, out_dir, cfg)
    _print_ingest(report)


@app.command()
def listen(
    spool: Path = typer.Argument(..., help="folder the received instances are written to (an msk ingest source)"),
    allow: Optional[str] = typer.Option(None, "--allow", help="calling AE titles allowed to send, comma-separated "
                                        "(required here or as allowed_callers in --config)"),
    ae_title: Optional[str] = typer.Option(None, help="msk's own AE title \\[default: MSK]"),
    host: Optional[str] = typer.Option(None, help="address to listen on \\[default: 127.0.0.1]"),
    port: Optional[int] = typer.Option(None, help="TCP port; 0 takes a free one \\[default: 11112]"),
    config: ConfigFile = None,
) -> None:
    """Receive DICOM (C-STORE SCP, answers C-ECHO) into SPOOL until Ctrl-C or SIGTERM (exit 0); then msk ingest SPOOL OUT.

    Each instance is written durably (temp file, fsync, rename) before it is acknowledged, as
    SPOOL/<calling AE>/<SOP Instance UID>-<hash>.dcm; callers not in the allow-list are rejected.

    [b]Example[/b]: [cyan]msk listen /data/spool --allow CR01,PACS --host 10.0.0.5 --port 11112[/cyan]
    """
    import threading

    from msk.core.config import load_config
    from msk.core.runtime.shutdown import Interrupted
    from msk.core.stages.listen.receiver import ListenConfig, Receiver

    cfg = load_config(ListenConfig, config, ae_title=ae_title, host=host, port=port,
                      allowed_callers=allow.split(",") if allow is not None else None)
    receiver = Receiver(spool, cfg)
    bound_host, bound_port = receiver.start()
    out.print(f"listening on {bound_host}:{bound_port} as {cfg.ae_title} for {', '.join(cfg.allowed_callers)}; "
              f"spool {receiver.spool}", soft_wrap=True)
    try:
        threading.Event().wait()  # until SIGINT/SIGTERM (msk.core.runtime.shutdown raises here)
    except (KeyboardInterrupt, Interrupted):
        pass  # stopping is how a receiver ends: exit 0, like msk serve
    finally:
        receiver.stop()
        counts = receiver.counts
        out.print(f"stopped: {counts['stored']} stored, {counts['resent']} already in the spool, "
                  f"{counts['failed']} refused (not written), {counts['echo']} C-ECHO")


def _print_ingest(report) -> None:
    reasons = ", ".join(f"{k}: {v}" for k, v in sorted(report.by_reason.items())) or "none"
    out.print(f"{report.n_inputs} inputs: {report.n_ok} ok, {report.n_quarantined} quarantined "
              f"({reasons}); {report.n_skipped_existing} already done; {report.seconds:.1f} s")
    kept = ", ".join(f"{k} {v}" for k, v in report.by_modality.items()) or "nothing"
    flagged = ", ".join(f"{k} {v}" for k, v in report.by_warning.items()) or "none"
    out.print(f"kept by modality: {kept}; warnings: {flagged}")
    out.print(f"shards:   {report.out / 'shards'}")
    out.print(f"manifest: {report.manifest}")


@app.command("import")
@locks_run("out_dir")
def import_(
    dataset: str = typer.Argument(..., metavar="DATASET", help="dataset layout: csv, folders, mura, btxrd (`msk plugins dataset`)"),
    src: Path = typer.Argument(..., metavar="SRC", help="the dataset's folder"),
    out_dir: Path = typer.Argument(..., metavar="OUT", help="output folder (shards, manifest, labels.csv)"),
    option: list[str] = typer.Option([], "--option", "-o", help="KEY=VALUE option of the layout (repeatable; VALUE is YAML)"),
    image_size: Optional[int] = typer.Option(None, help="output side length in px \\[default: 256]"),
    key_file: Optional[Path] = typer.Option(None, help="pseudonymisation key file (env MSK_PSEUDONYM_KEY wins)"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML with blocks `options:` (the layout's) "
                                          "and `ingest:` (as msk ingest); command-line options override it."),
) -> None:
    """Import a labelled dataset: ingest exactly the files its layout labels and write
    OUT/labels.csv (image_id,label,patient_id,...) for `msk train sorter` and the tumour
    evaluations. Patient ids are keyed pseudonyms. Resumable; re-running is idempotent.

    [b]Example[/b]: [cyan]msk import csv ../shared/data/real-xr out/real-xr --option label_column=region --image-size 256[/cyan]
    """
    import yaml

    from msk.core.config import load_config
    from msk.core.errors import ConfigError
    from msk.core.stages.ingest.importing import ImportConfig, import_dataset

    cfg = load_config(ImportConfig, config)
    options = dict(cfg.options)
    for item in option:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--option {item!r}: expected KEY=VALUE")
        options[key.strip()] = yaml.safe_load(value) if value.strip() else None
    ingest_options = cfg.ingest.model_dump(exclude_unset=True)
    ingest_options.update({k: v for k, v in (("image_size", image_size), ("key_file", key_file))
                           if v is not None})
    cfg = load_config(ImportConfig, None, options=options, ingest=ingest_options)
    report = import_dataset(dataset, src, out_dir, cfg)
    _print_ingest(report.ingest)
    lost = ", ".join(f"{k}: {v} (e.g. {report.examples[k]})" for k, v in report.quarantined.items())
    out.print(f"{report.n_records} labelled files: {report.n_labelled} in the labels file, "
              f"{report.n_quarantined} quarantined by the ingest and left out{f' ({lost})' if lost else ''}")
    out.print(f"{len(report.by_label)} labels, {report.n_patients} patients/groups: "
              + ", ".join(f"{k} {v}" for k, v in report.by_label.items()))
    out.print(f"labels:   {report.labels}")


@app.command()
@locks_run("run_dir")
def cluster(
    ingest_dir: Path = typer.Argument(..., metavar="INGEST", help="output folder of `msk ingest`"),
    run_dir: Path = typer.Argument(..., metavar="RUN", help="run folder (checkpoints, history, assignments)"),
    k: Optional[int] = typer.Option(None, help="number of clusters \\[default: about one per 20 images, 10..1000]"),
    epochs: Optional[int] = typer.Option(None, help="epochs \\[default: by --profile: cpu 5, gpu 10]"),
    encoder: Optional[str] = typer.Option(None, help="encoder name, see `msk plugins encoder` \\[default: resnet18]"),
    image_size: Optional[int] = typer.Option(None, help="input side length \\[default: by --profile: cpu 64, gpu 128]"),
    num_workers: Optional[int] = typer.Option(None, help="Ray Train workers; 0 = in this process "
                                              "\\[default: by --profile: cpu 0, gpu 1]"),
    use_gpu: UseGpu = None,
    truth: Optional[Path] = typer.Option(None, "--truth", help="known regions (labels.csv or a synthetic "
                                         "ground_truth.csv) for nmi_truth/purity per epoch; never trained on"),
    profile: Profile = "auto",
    config: ConfigFile = None,
) -> None:
    """Self-supervised DeepCluster: alternate k-means on features and training on the clusters.

    Logs NMI between consecutive epochs' assignments (and against --truth); re-running the same RUN resumes.

    [b]Example[/b]: [cyan]msk cluster out/ingest out/cluster --k 1000 --epochs 10 --encoder resnet18[/cyan]
    """
    from msk.core.config import load_config
    from msk.core.models.deepcluster import DeepClusterConfig, from_ingest, run_deepcluster

    cfg = load_config(DeepClusterConfig, config, k=k, epochs=epochs, encoder=encoder,
                      image_size=image_size, num_workers=num_workers, use_gpu=use_gpu)
    cfg = _profiled(cfg, "cluster", profile, run_dir)
    images, table = from_ingest(ingest_dir, columns=["image_id", "image", "height", "width"])
    image_ids = table["image_id"].to_pylist()
    known = None
    if truth is not None:
        from msk.core.stages.cluster.labelling import truth_of_images

        known = truth_of_images(image_ids, truth, ingest_dir, ingest=ingest_dir)
        if None in known:
            console.print(f"[yellow]note:[/yellow] {known.count(None)} of {len(known)} images have no label in "
                          f"{truth}; they count as one class '(unknown)' in nmi_truth")
    named = None if known is None else [t or "(unknown)" for t in known]
    result = run_deepcluster(images, cfg, out=run_dir, image_ids=image_ids, ground_truth=named)
    out.print(result.table())
    out.print(f"assignments: {result.out / 'assignments.csv'}")
    out.print(f"checkpoint:  {result.checkpoint}")


clusters_app = typer.Typer(help="Label DeepCluster clusters by hand (export, apply: contact sheets in, weak "
                           "labels out) or from a truth file (label).",
                           no_args_is_help=True)
app.add_typer(clusters_app, name="clusters")


def _run_images_and_k(run_dir: Path, ingest_dir: Path | None):
    from msk.core.config import load_config
    from msk.core.io.labels import load_assignments
    from msk.core.models.deepcluster import DeepClusterConfig, from_ingest

    cfg = load_config(DeepClusterConfig, run_dir / "config.yaml")
    images = None
    if ingest_dir is not None:
        images, _ = from_ingest(ingest_dir, columns=["image_id", "image", "height", "width"])
    return images, load_assignments(run_dir), cfg.k


@clusters_app.command("export")
@locks_run("to")
def clusters_export(
    ingest_dir: Path = typer.Argument(..., metavar="INGEST", help="output folder of `msk ingest`"),
    run_dir: Path = typer.Argument(..., metavar="RUN", help="run folder of `msk cluster`"),
    to: Path = typer.Option(..., "--to", help="folder for the contact sheets, index.html and labels.csv"),
    per_sheet: int = typer.Option(36, help="thumbnails per cluster"),
    truth: Optional[Path] = typer.Option(None, "--truth", help="known regions (labels.csv or a synthetic "
                                         "ground_truth.csv): each cluster's make-up on the index, NMI and purity"),
) -> None:
    """Write one contact sheet per cluster, an HTML index and a labels.csv to fill in.

    [b]Example[/b]: [cyan]msk clusters export out/ingest out/cluster --to out/sheets --truth labels.csv[/cyan]
    """
    from msk.core.stages.cluster.labelling import export_clusters, run_image_ids, truth_of_images, truth_scores

    images, assignments, k = _run_images_and_k(run_dir, ingest_dir)
    known = None
    if truth is not None:
        known = truth_of_images(run_image_ids(run_dir), truth, run_dir, ingest=ingest_dir)
        nmi, purity, n = truth_scores(assignments, known)
        out.print(f"against {truth}: NMI {nmi:.3f}, purity {purity:.3f} over the {n} of {len(known)} "
                  f"images with a known region (k={k})")
    index = export_clusters(images, assignments, to, per_sheet=per_sheet, k=k,
                            ground_truth=None if known is None else [t or "(unknown)" for t in known])
    out.print(f"contact sheets: {index}")
    out.print(f"fill in:        {to / 'labels.csv'} (a region name or 'discard' per cluster)")


@clusters_app.command("apply")
@locks_run("run_dir")
def clusters_apply(
    labels_file: Path = typer.Argument(..., metavar="LABELS", help="filled-in labels.csv or YAML"),
    run_dir: Path = typer.Argument(..., metavar="RUN", help="run folder of `msk cluster`"),
    region_set: str = typer.Option("samx-regions", help="entity set the names belong to"),
    save: Optional[Path] = typer.Option(None, help="weak labels CSV \\[default: RUN/weak_labels.csv]"),
) -> None:
    """Merge same-named clusters into weak classes, drop discarded ones, report class counts.

    [b]Example[/b]: [cyan]msk clusters apply out/sheets/labels.csv out/cluster[/cyan]
    """
    import csv

    from msk.core.io.labels import apply_labels

    _, assignments, k = _run_images_and_k(run_dir, None)
    weak = apply_labels(labels_file, assignments, region_set=region_set, k=k)
    with open(run_dir / "assignments.csv", newline="") as f:
        image_ids = [row["image_id"] for row in csv.DictReader(f)]
    target = save or run_dir / "weak_labels.csv"
    weak.save(target, image_ids, run=run_dir)
    out.print(weak.table())
    out.print(f"weak labels: {target}")


@clusters_app.command("label")
@locks_run("run_dir")
def clusters_label(
    run_dir: Path = typer.Argument(..., metavar="RUN", help="run folder of `msk cluster`"),
    truth: Path = typer.Option(..., "--from", help="truth CSV: labels.csv (image_id,label) or a synthetic "
                               "ground_truth.csv (then --ingest)"),
    ingest_dir: Optional[Path] = typer.Option(None, "--ingest", help="the run's ingest folder (needed for a "
                                              "synthetic ground_truth.csv, keyed by file path)"),
    region_set: str = typer.Option("samx-regions", help="entity set the names belong to"),
    save: Optional[Path] = typer.Option(None, "--out", help="weak labels CSV \\[default: RUN/weak_labels.csv]"),
) -> None:
    """Name every cluster by the majority region of its images in a truth file (a simulated
    expert), with its purity: writes RUN/cluster_names.csv (named_by: automatic:FILE) and the
    weak labels `msk train sorter` takes.

    [b]Example[/b]: [cyan]msk clusters label out/cluster --from out/synth/ground_truth.csv --ingest out/ingest[/cyan]
    """
    from msk.core.stages.cluster.labelling import name_clusters_from_truth

    named = name_clusters_from_truth(run_dir, truth, ingest=ingest_dir, region_set=region_set, weak_out=save)
    console.print(f"[bold yellow]simulated expert:[/bold yellow] clusters named automatically by the majority "
                  f"label of {truth}, not by a person (named_by: {named.named_by})", soft_wrap=True)
    out.print(named.weak.table())
    for line in named.lines():
        out.print(line, soft_wrap=True)
    out.print(f"cluster names: {named.names_file} (cluster, size, label, purity, named_by)", soft_wrap=True)
    out.print(f"weak labels:   {named.weak_file}", soft_wrap=True)


@clusters_app.command("review")
def clusters_review(
    ingest_dir: Path = typer.Argument(..., metavar="INGEST", help="output folder of `msk ingest` (the images)"),
    run_dir: Path = typer.Argument(..., metavar="RUN", help="run folder of `msk cluster`"),
    host: Optional[str] = typer.Option(None, help="address to listen on \\[default: 127.0.0.1; any other "
                                       "needs the token]"),
    port: Optional[int] = typer.Option(None, help="port \\[default: 8765]"),
    reviewer: Optional[str] = typer.Option(None, help="your name in the audit log \\[default: login name]"),
    region_set: Optional[str] = typer.Option(None, help="entity set the names belong to \\[default: samx-regions]"),
    hint_previous: Optional[Path] = typer.Option(None, help="hint: weak labels CSV of a previous run (off by default)"),
    hint_truth: Optional[Path] = typer.Option(None, help="hint: partial truth CSV, majority and purity per "
                                              "cluster (off by default)"),
    config: ConfigFile = None,
) -> None:
    """Name the clusters in a browser, one at a time, by keyboard: every decision is saved at once to
    RUN/expert/labels.csv (what `msk clusters apply` reads) and RUN/expert/audit.csv; restarting resumes.

    [b]Example[/b]: [cyan]msk clusters review out/ingest out/cluster --reviewer dr-lee[/cyan]
    """
    from msk.core.config import load_config
    from msk.core.stages.cluster.review import ReviewConfig, serve_review

    cfg = load_config(ReviewConfig, config, host=host, port=port, reviewer=reviewer, region_set=region_set,
                      hint_previous=hint_previous, hint_truth=hint_truth)
    serve_review(ingest_dir, run_dir, cfg, say=lambda line: out.print(line, soft_wrap=True, highlight=False))


train_app = typer.Typer(help="Supervised training on weak or expert labels.", no_args_is_help=True)
app.add_typer(train_app, name="train")


@train_app.command("sorter")
@locks_run("out_dir")
def train_sorter(
    ingest_dir: Path = typer.Argument(..., metavar="INGEST", help="output folder of `msk ingest`"),
    labels: Path = typer.Argument(..., metavar="LABELS", help="weak labels CSV (image_id,label) from `msk clusters apply`"),
    out_dir: Path = typer.Argument(..., metavar="OUT", help="run folder (folds, checkpoints, report)"),
    init: Optional[str] = typer.Option(None, help="checkpoint to fine-tune, or 'random' \\[default: the last checkpoint "
                                       "of the DeepCluster run LABELS came from (`msk clusters apply/label`), else random]"),
    encoder: Optional[str] = typer.Option(None, help="encoder name \\[default: resnet18]"),
    image_size: Optional[int] = typer.Option(None, help="network input side \\[default: by --profile: cpu 64, gpu 128]"),
    epochs: Optional[int] = typer.Option(None, help="epochs per fold \\[default: by --profile: cpu 5, gpu 10]"),
    folds: Optional[int] = typer.Option(None, help="cross-validation folds \\[default: by --profile: cpu 3, gpu 5]"),
    num_workers: Optional[int] = typer.Option(None, help="Ray Train workers; 0 = in this process "
                                              "\\[default: by --profile: cpu 0, gpu 1]"),
    use_gpu: UseGpu = None,
    profile: Profile = "auto",
    holdout_ingest: Optional[Path] = typer.Option(None, help="external hold-out ingest folder"),
    holdout_labels: Optional[Path] = typer.Option(None, help="labels of the external hold-out"),
    splits_from: Optional[Path] = typer.Option(None, help="an earlier run's splits.csv: the same test "
                                               "set and folds, e.g. after correcting labels"),
    config: ConfigFile = None,
) -> None:
    """Train the anatomical sorter (SAM-X): patient-level test set + k-fold CV, top-1/top-2,
    confusion matrix, Grad-CAM averaged over the fold models. Re-running resumes.

    [b]Example[/b]: [cyan]msk train sorter out/ingest out/cluster/weak_labels.csv out/sorter --init out/cluster/checkpoints/epoch-010.pt[/cyan]
    """
    from msk.core.config import load_config
    from msk.core.stages.sorter.training import SorterConfig, init_from_weak_labels, sorter_from_ingest

    cfg = load_config(SorterConfig, config, init=init, encoder=encoder, epochs=epochs, folds=folds,
                      num_workers=num_workers, use_gpu=use_gpu, image_size=image_size,
                      splits_from=splits_from)
    cfg = _profiled(cfg, "sorter", profile, out_dir)
    cfg, note = init_from_weak_labels(cfg, labels)
    if note:
        console.print(note, soft_wrap=True, highlight=False)
    result = sorter_from_ingest(ingest_dir, labels, cfg, out=out_dir, holdout_ingest=holdout_ingest,
                                holdout_labels=holdout_labels)
    out.print(result.table())
    out.print(f"report: {out_dir}")


@app.command()
def sort(
    run_dir: Path = typer.Argument(..., metavar="RUN", help="run folder of `msk train sorter`"),
    images: list[Path] = typer.Argument(..., metavar="IMAGE", help="DICOM, PNG or JPEG files"),
    k: int = typer.Option(3, "--k", min=1, help="regions shown per image"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON document instead of lines"),
    ingest_dir: Optional[Path] = typer.Option(None, "--ingest", help="the run's ingest folder, if "
                                              "sorter.json does not record its image size"),
) -> None:
    """Sort image files with a trained sorter: the top-k regions with probabilities, or
    `unknown` when an image scores below the run's calibrated threshold (not a radiograph
    like the training images). Unreadable files get one line each (file: reason), exit 2.

    [b]Example[/b]: [cyan]msk sort out/sorter scans/hand.png scans/knee.dcm --k 3[/cyan]
    """
    import json

    from msk.core.models.sorter import load_sorter, sort_answer
    from msk.core.stages.sorter.sorting import read_images, run_preprocess

    preprocess = run_preprocess(run_dir, ingest_dir)
    read = read_images(images, preprocess)
    for error in read.errors:
        typer.echo(f"error: {error.line()}", err=True)  # plain lines: never wrapped
    answers = []
    if read.paths:
        ensemble = load_sorter(run_dir)
        probs, scores = ensemble.predict_scores(read.images)
        answers = [{"file": path, **sort_answer(p, s, ensemble, k)}
                   for path, p, s in zip(read.paths, probs, scores)]
    if as_json:
        typer.echo(json.dumps({"run": str(run_dir), "images": answers,
                               "errors": [{"file": e.path, "reason": e.reason, "message": e.message}
                                          for e in read.errors]}, indent=2))
    for a in answers if not as_json else []:
        verdict = "unknown" if a["unknown"] else a["regions"][0]["name"]
        if a["threshold"] is not None:
            verdict += (f" ({a['score_name']} {a['score']:.3g} "
                        f"{'<' if a['unknown'] else '>='} {a['threshold']:.3g})")
        ranked = ", ".join(f"{r['name']} {r['probability']:.3f}" for r in a["regions"])
        typer.echo(f"{a['file']}: {verdict}; {ranked}")
    if read.errors:
        raise typer.Exit(2)


@app.command()
def checkpoint(
    path: Path = typer.Argument(..., metavar="FILE", help="a checkpoint msk wrote (best.pt, epoch-*.pt)"),
    as_json: bool = typer.Option(False, "--json", help="print the record as JSON"),
) -> None:
    """Show what a saved model is: its record (task, classes, input size and preprocessing, how the
    ingest squared its images, encoder and head, metadata encoder, the data it was trained on by
    hash, its metrics). A checkpoint from before records existed is shown converted (format 0).

    [b]Example[/b]: [cyan]msk checkpoint out/sorter/fold-1/best.pt[/cyan]
    """
    from rich.table import Table

    from msk.core.models.record import read_record

    record = read_record(path)
    if as_json:
        typer.echo(record.model_dump_json(indent=2))
        return
    table = Table(title=str(path), title_justify="left", show_header=False)
    for name, value in record.summary():
        table.add_row(name, value)
    out.print(table)


@app.command()
def segment(
    run_dir: Path = typer.Argument(..., metavar="RUN", help="run folder of `msk train segmenter`"),
    inputs: list[Path] = typer.Argument(..., metavar="FILE_OR_DIR", help="DICOM, PNG or JPEG files, or folders "
                                        "of them (searched recursively)"),
    out_dir: Path = typer.Option(..., "--out", help="folder for <name>.mask.png, <name>.seg.dcm and segment.csv"),
    dicom_seg: bool = typer.Option(False, "--dicom-seg", help="also write each DICOM file's mask as a DICOM "
                                   "Segmentation object (<name>.seg.dcm) referencing it, for a PACS"),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="lesion probability threshold "
                                              "\\[default: the run's]"),
    ingest_dir: Optional[Path] = typer.Option(None, "--ingest", help="the run's ingest folder, if segmenter.json "
                                              "does not record how its images were squared"),
) -> None:
    """Segment the lesion in image files with a trained segmenter: a mask in each file's own
    pixels (PNG), its box, and with --dicom-seg a DICOM Segmentation for each DICOM file.
    Unreadable files and images without a lesion get one line each (file: reason), exit 2.

    [b]Example[/b]: [cyan]msk segment out/segmenter scans/knee.dcm scans/hips/ --out out/masks --dicom-seg[/cyan]
    """
    from msk.core.config import load_config
    from msk.core.stages.segmentation.segmenting import SegmentOptions, segment_files

    options = load_config(SegmentOptions, None, threshold=threshold, dicom_seg=dicom_seg)

    def show(row) -> None:  # plain lines: never wrapped
        typer.echo(row.line(), err=row.problem)

    result = segment_files(run_dir, inputs, out_dir, options=options, ingest=ingest_dir, on_row=show)
    for note in result.notes:
        typer.echo(f"note: {note}", err=True)
    typer.echo(result.summary())
    if result.problems:
        raise typer.Exit(2)


@train_app.command("transfer")
@locks_run("out_dir")
def train_transfer(
    ingest_dir: Path = typer.Argument(..., metavar="INGEST", help="output folder of `msk ingest`"),
    labels: Path = typer.Argument(..., metavar="LABELS", help="CSV image_id,label of the downstream task"),
    out_dir: Path = typer.Argument(..., metavar="OUT", help="run folder"),
    arm: list[str] = typer.Option([], "--arm", help="NAME=CHECKPOINT (an msk checkpoint) or NAME=pretrained:WEIGHTS (a weights file or "
                                 "hf-hub:org/name) to compare with random init (repeatable)"),
    cascade: bool = typer.Option(False, help="phase 1 normal vs pathological, phase 2 entity A vs B"),
    positive: Optional[str] = typer.Option(None, help="positive class for sensitivity/specificity"),
    image_size: Optional[int] = typer.Option(None, help="network input side \\[default: by --profile: cpu 64, gpu 128]"),
    epochs: Optional[int] = typer.Option(None, help="epochs per fold \\[default: by --profile: cpu 5, gpu 10]"),
    profile: Profile = "auto",
    config: ConfigFile = None,
) -> None:
    """Fine-tune on a small labelled task from random init, msk checkpoints and pretrained weights, side by side.

    [b]Example[/b]: [cyan]msk train transfer out/ingest task.csv out/transfer --arm deepcluster=out/cluster/checkpoints/epoch-010.pt --arm imagenet=pretrained:weights/resnet18.safetensors[/cyan]
    """
    from msk.core.config import load_config
    from msk.core.errors import ConfigError
    from msk.core.stages.sorter.transfer import TransferConfig, transfer_from_ingest

    arms = {"random": "random"}
    for item in arm:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--arm {item!r}: expected NAME=CHECKPOINT or NAME=pretrained:WEIGHTS")
        arms[name] = path
    cfg = load_config(TransferConfig, config, arms=arms if arm else None, cascade=cascade or None,
                      positive=positive, epochs=epochs, image_size=image_size)
    cfg = _profiled(cfg, "transfer", profile, out_dir)
    result = transfer_from_ingest(ingest_dir, labels, cfg, out=out_dir)
    out.print(result.table())
    out.print(f"report: {out_dir}")


@app.command()
@locks_run("out_dir")
def embed(
    ingest_dir: Path = typer.Argument(..., metavar="INGEST", help="output folder of `msk ingest`"),
    checkpoint: Path = typer.Argument(..., help="msk checkpoint (DeepCluster encoder or trained classifier)"),
    out_dir: Path = typer.Argument(..., metavar="OUT", help="folder for embeddings.parquet"),
    image_size: Optional[int] = typer.Option(None, help="network input side \\[default: the checkpoint's training size]"),
    config: ConfigFile = None,
) -> None:
    """L2-normalised embeddings of every ingested image (Ray Data, batched; GPU when configured).

    [b]Example[/b]: [cyan]msk embed out/ingest out/cluster/checkpoints/epoch-010.pt out/embeddings[/cyan]
    """
    from msk.core.config import load_config
    from msk.core.models.embed import EmbedConfig
    from msk.core.models.embed import embed as run_embed

    report = run_embed(ingest_dir, checkpoint, out_dir, load_config(EmbedConfig, config, image_size=image_size))
    out.print(f"{report.n_images} embeddings of dimension {report.dim} in {report.seconds:.1f} s")
    out.print(f"embeddings: {report.file}")


@train_app.command("segmenter")
@locks_run("out_dir")
def train_segmenter(
    ingest_dir: Path = typer.Argument(..., metavar="INGEST", help="output folder of `msk ingest`"),
    masks: Path = typer.Argument(..., metavar="MASKS", help="masks table (image_id,mask_path[,label]; PNG or "
                                 "LabelMe JSON masks) or a `msk synth` output folder"),
    out_dir: Path = typer.Argument(..., metavar="OUT", help="run folder (splits, folds, checkpoints)"),
    segmenter: Optional[str] = typer.Option(None, help="unet or unetplusplus (`msk plugins segmenter`) \\[default: unet]"),
    encoder: Optional[str] = typer.Option(None, help="smp encoder or tu-<timm name> \\[default: resnet34]"),
    image_size: Optional[int] = typer.Option(None, help="network input side, a multiple of 32 "
                                             "\\[default: by --profile: cpu 64, gpu 128]"),
    epochs: Optional[int] = typer.Option(None, help="epochs per fold \\[default: by --profile: cpu 5, gpu 10]"),
    folds: Optional[int] = typer.Option(None, help="cross-validation folds \\[default: by --profile: cpu 3, gpu 5]"),
    num_workers: Optional[int] = typer.Option(None, help="Ray Train workers; 0 = in this process "
                                              "\\[default: by --profile: cpu 0, gpu 1]"),
    use_gpu: UseGpu = None,
    profile: Profile = "auto",
    config: ConfigFile = None,
) -> None:
    """Train a lesion segmenter (U-Net / U-Net++, BCE + Dice): patient-level test set + k-fold CV
    on the training loop of every msk model (Ray Train, checkpoints, early stopping). Re-running resumes.

    [b]Example[/b]: [cyan]msk train segmenter out/ingest out/synth out/segmenter --segmenter unetplusplus --epochs 20[/cyan]
    """
    from msk.core.config import load_config
    from msk.core.stages.segmentation.training import SegmenterConfig, load_segmentation_data
    from msk.core.stages.segmentation.training import train_segmenter as train

    cfg = load_config(SegmenterConfig, config, segmenter=segmenter, encoder=encoder, image_size=image_size,
                      epochs=epochs, folds=folds, num_workers=num_workers, use_gpu=use_gpu)
    cfg = _profiled(cfg, "segmenter", profile, out_dir)
    data = load_segmentation_data(ingest_dir, masks)
    for note in data.notes:
        console.print(f"[yellow]note:[/yellow] {note}")
    result = train(data, cfg, out=out_dir)
    out.print(result.summary())
    out.print(f"run: {out_dir}; evaluate with `msk eval segmenter {out_dir} {ingest_dir} {masks} OUT`")


eval_app = typer.Typer(help="Evaluation protocols (patient-level splits, repeated, with baselines).",
                       no_args_is_help=True)
app.add_typer(eval_app, name="eval")


@eval_app.command("sorter")
@locks_run("run_dir")
def eval_sorter(
    run_dir: Path = typer.Argument(..., metavar="RUN", help="run folder of `msk train sorter`"),
    truth: Path = typer.Option(..., "--truth", help="known regions: labels.csv (image_id,label) or a synthetic "
                               "ground_truth.csv"),
    ingest_dir: Optional[Path] = typer.Option(None, "--ingest", help="the run's ingest folder, for a synthetic "
                                              "ground_truth.csv \\[default: the one sorter.json records]"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON document instead of the table"),
) -> None:
    """Score a sorter's test images against a truth file, next to its scores against the weak
    labels it was trained on (top-1/top-2 of the saved ensemble predictions; no model is run).
    Writes RUN/truth_eval.json.

    [b]Example[/b]: [cyan]msk eval sorter out/sorter --truth out/synth/ground_truth.csv[/cyan]
    """
    import dataclasses
    import json

    from msk.core.stages.sorter.evaluation import evaluate_against_truth

    result = evaluate_against_truth(run_dir, truth, ingest=ingest_dir)
    if as_json:
        typer.echo(json.dumps(dataclasses.asdict(result), indent=2))
    else:
        out.print(result.table())


@eval_app.command("segmenter")
@locks_run("out_dir")
def eval_segmenter(
    run_dir: Path = typer.Argument(..., metavar="RUN", help="run folder of `msk train segmenter`"),
    ingest_dir: Path = typer.Argument(..., metavar="INGEST", help="output folder of `msk ingest`"),
    masks: Path = typer.Argument(..., metavar="MASKS", help="masks table or `msk synth` output folder"),
    out_dir: Path = typer.Argument(..., metavar="OUT", help="folder for scores.csv, report.json and the overlays"),
    sheet_images: int = typer.Option(16, help="images on the overlay sheet"),
) -> None:
    """IoU and Dice of a segmenter run on its held-out images (test set, and images it never saw),
    per entity and overall, with an overlay sheet (image, truth, prediction) as PNG + HTML.

    [b]Example[/b]: [cyan]msk eval segmenter out/segmenter out/ingest out/synth out/segmenter-eval[/cyan]
    """
    from msk.core.stages.segmentation.evaluation import evaluate_segmenter

    result = evaluate_segmenter(run_dir, ingest_dir, masks, out_dir, sheet_images=sheet_images)
    out.print(result.table())
    out.print(f"overlays: {result.page}")


@eval_app.command("recommender")
@locks_run("out_dir")
def eval_recommender(
    ingest_dir: Path = typer.Argument(..., metavar="INGEST", help="output folder of `msk ingest`"),
    labels: Path = typer.Argument(..., metavar="LABELS", help="CSV image_id,entity (optional x0,y0,x1,y1 lesion box)"),
    out_dir: Path = typer.Argument(..., metavar="OUT", help="report folder (tables, gallery, confusion matrices)"),
    image_size: Optional[int] = typer.Option(None, help="network input side, a multiple of 8 (the default ViT's "
                                             "img_size follows it) \\[default: 64]"),
    profile: Profile = "auto",
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON records instead of the table"),
    config: ConfigFile = None,
) -> None:
    """Vote over the k most similar previous patients vs CNN/transformer classifiers, 3 seeds,
    patient-level 80/20, ANOVA + Tukey HSD; Markdown/CSV table and a retrieval gallery.

    [b]Example[/b]: [cyan]msk eval recommender out/ingest labels.csv out/eval-recommender[/cyan]
    """
    from msk.core.config import load_config
    from msk.core.stages.recommender.config import RecommenderEvalConfig
    from msk.core.stages.recommender.evaluation import evaluate_recommender

    cfg = load_config(RecommenderEvalConfig, config)
    if image_size is not None:
        from msk.core.profiles import set_options

        options: dict = {"image_size": image_size}
        if "classifiers" not in cfg.model_fields_set:  # the default ViT's img_size follows image_size
            options["classifiers"] = [c.model_dump() for c in cfg.classifiers]
            for c in options["classifiers"]:
                if "img_size" in c["encoder_options"]:
                    c["encoder_options"]["img_size"] = image_size
        cfg = set_options(cfg, options)
    cfg = _profiled(cfg, "recommender", profile, out_dir)
    result = evaluate_recommender(ingest_dir, labels, out_dir, cfg)
    if as_json:
        print(result.summary.to_json(orient="records", indent=1))
        return
    # plain text, never rich markup (model names like "[cnn]" are not tags), and never wrapped
    out.print(result.summary.to_string(), markup=False, highlight=False, soft_wrap=True)
    out.print(f"report: {result.out}")


@eval_app.command("fusion")
@locks_run("out_dir")
def eval_fusion(
    ingest_dir: Path = typer.Argument(..., metavar="INGEST", help="output folder of `msk ingest`"),
    metadata: Path = typer.Argument(..., metavar="METADATA", help="CSV of image_id, entity and clinical metadata"),
    out_dir: Path = typer.Argument(..., metavar="OUT", help="report folder"),
    image_size: Optional[int] = typer.Option(None, help="network input side of every image model (train.image_size) "
                                             "\\[default: 64]"),
    profile: Profile = "auto",
    config: ConfigFile = None,
) -> None:
    """Image-only vs metadata-only vs fusion vs XGBoost under patient-level k-fold CV, with fold
    ensembles, confusion matrix, GradientShap per metadata feature and Grad-CAM.

    [b]Example[/b]: [cyan]msk eval fusion out/ingest metadata.csv out/eval-fusion[/cyan]
    """
    from msk.core.config import load_config
    from msk.core.profiles import set_options
    from msk.core.stages.fusion.config import FusionConfig
    from msk.core.stages.fusion.training import evaluate_fusion

    cfg = set_options(load_config(FusionConfig, config), {"train.image_size": image_size})
    cfg = _profiled(cfg, "fusion", profile, out_dir)
    result = evaluate_fusion(ingest_dir, metadata, cfg, out=out_dir)
    out.print(result.markdown())
    out.print(f"report: {out_dir}")


build_app = typer.Typer(help="Build deployable artefacts from an ingest and its labels.", no_args_is_help=True)
app.add_typer(build_app, name="build")


@build_app.command("recommender")
@locks_run("out_dir")
def build_recommender(
    ingest_dir: Path = typer.Argument(..., metavar="INGEST", help="output folder of `msk ingest` / `msk import`"),
    labels: Path = typer.Argument(..., metavar="LABELS", help="entities: labels.csv (image_id,label or entity"
                                  "[,patient_id][,x0,y0,x1,y1]) or a synthetic ground_truth.csv"),
    out_dir: Path = typer.Argument(..., metavar="OUT", help="folder for the saved recommender"),
    encoder: Path = typer.Option(..., "--encoder", help="encoder checkpoint (DeepCluster epoch-NNN.pt or a "
                                 "trained model's best.pt)"),
    boxes: Optional[Path] = typer.Option(None, "--boxes", help="lesion boxes CSV image_id,x0,y0,x1,y1 (source "
                                         "pixels) \\[default: LABELS' box columns, if any]"),
    masks: Optional[Path] = typer.Option(None, "--masks", help="masks table image_id,mask_path: boxes from "
                                         "each mask's extent"),
    k: Optional[int] = typer.Option(None, "--k", help="neighbours that vote \\[default: 3]"),
    image_size: Optional[int] = typer.Option(None, help="encoder input side \\[default: the checkpoint's]"),
    config: ConfigFile = None,
) -> None:
    """Embed the labelled images (lesion crops when boxes or masks are known, else whole images)
    and save a recommender that `msk serve` loads; it records what it compares (roi_margin).

    [b]Example[/b]: [cyan]msk build recommender out/ingest out/synth/ground_truth.csv out/recommender --encoder out/cluster/checkpoints/epoch-010.pt[/cyan]
    """
    from msk.core.config import load_config
    from msk.core.stages.recommender.build import RecommenderBuildConfig
    from msk.core.stages.recommender.build import build_recommender as build

    report = build(ingest_dir, labels, out_dir, encoder, load_config(RecommenderBuildConfig, config, k=k, image_size=image_size),
                   boxes=boxes, masks=masks)
    for line in report.lines():
        out.print(line, soft_wrap=True)
    out.print(f"recommender: {report.out}", soft_wrap=True)


@app.command()
@locks_run("out_dir")
def tune(
    task: str = typer.Argument(..., metavar="TASK", help="sorter, fusion, recommender or a plugin's "
                              "(`msk plugins tuning_task`)"),
    ingest_dir: Path = typer.Argument(..., metavar="INGEST", help="output folder of `msk ingest`"),
    labels: Path = typer.Argument(..., metavar="LABELS", help="the labels the task's command takes: "
                                  "weak labels (sorter), metadata CSV (fusion), image_id,entity CSV (recommender)"),
    out_dir: Path = typer.Argument(..., metavar="OUT", help="result folder: best.yaml, trials.csv, trials/"),
    samples: Optional[int] = typer.Option(None, "--samples", "-n", help="trials \\[default: 8]"),
    space: Optional[Path] = typer.Option(None, help="search space YAML \\[default: tune/TASK.yaml]"),
    num_workers: Optional[int] = typer.Option(None, help="Ray Train workers per trial; 0 = in the trial \\[default: 1]"),
    use_gpu: UseGpu = None,
    max_concurrent: Optional[int] = typer.Option(None, help="trials at once \\[default: what the cluster fits]"),
    seed: Optional[int] = typer.Option(None, help="sampler seed \\[default: 0]"),
    scheduler: Optional[str] = typer.Option(None, help="asha (stop poor trials early) or fifo \\[default: asha]"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="the task's config YAML that trials "
                                          "start from (the options the space leaves alone)"),
) -> None:
    """Search hyperparameters with Ray Tune (ASHA; each trial a Ray Train run) and write the
    best config as YAML for the task's training command (`msk train sorter`, `msk eval fusion`,
    `msk eval recommender` with --config).

    [b]Example[/b]: [cyan]msk tune sorter out/ingest out/cluster/weak_labels.csv out/tune-sorter --samples 16 --use-gpu[/cyan]
    """
    from msk.core.config import load_config
    from msk.core.stages.tuning.search import TuneOptions, get_task, load_space, load_task_data, tune_task

    spec = get_task(task)
    base = load_config(spec.config_cls, config)
    options = load_config(TuneOptions, None, samples=samples, num_workers=num_workers, use_gpu=use_gpu,
                          max_concurrent=max_concurrent, seed=seed, scheduler=scheduler)
    checked = load_space(task, space, base) if space is not None else None
    result = tune_task(task, load_task_data(task, ingest_dir, labels, base), out=out_dir,
                       space=checked, base=base, options=options)
    out.print(result.trials.to_string(index=False))
    out.print(result.summary())
    from msk.core.registry import tuning_task

    command = tuning_task(task).command
    out.print(f"next: {command} --config {result.best_yaml}")


@app.command()
def serve(
    config: Path = typer.Argument(..., help="serve config YAML (see msk/serve/serve.example.yaml)"),
    insecure: bool = typer.Option(False, "--insecure", help="disable bearer-token auth (loud warning)"),
    host: Optional[str] = typer.Option(None, help="bind address \\[default: from the config, 127.0.0.1]"),
    port: Optional[int] = typer.Option(None, help="port \\[default: from the config, 8000]"),
) -> None:
    """Serve /v1/sort, /v1/recommend and /v1/classify locally with Ray Serve until Ctrl-C or SIGTERM.

    Checkpoints and index come from CONFIG (relative paths from its folder) and are checked at
    start-up; the bearer token from MSK_SERVE_TOKEN or the config's token_file. Ctrl-C or SIGTERM
    shuts Serve and Ray down and exits 0.

    [b]Example[/b]: [cyan]MSK_SERVE_TOKEN=$(cat token) msk serve msk/serve/serve.example.yaml --port 8000[/cyan]
    """
    from msk.serve import serve_main

    url = serve_main(config, insecure=insecure, host=host, port=port, blocking=True)
    out.print(f"stopped serving {url}")


@app.command()
@locks_run("out_dir")
def demo(
    out_dir: Path = typer.Argument(Path("out/demo"), metavar="OUT", help="a new output folder"),
    n: Optional[int] = typer.Option(None, "--n", help="synthetic files \\[default: 1200]"),
    image_size: Optional[int] = typer.Option(None, help="ingest and network input side in px \\[default: 64]"),
    serve: Optional[bool] = typer.Option(None, "--serve/--no-serve", help="start msk serve and send requests "
                                         "of unseen patients \\[default: serve]"),
    config: ConfigFile = None,
) -> None:
    """Run the whole chain on the embedded synthetic default: synth -> ingest -> cluster -> clusters named
    by a SIMULATED expert (the synthetic truth) -> sorter -> lesion classifier -> recommender -> msk serve
    answering unseen patients over HTTP -> OUT/report.html. About 6 minutes on 2 idle CPUs.

    Synthetic data: the numbers show the chain works, not how msk does on real radiographs.

    [b]Example[/b]: [cyan]msk demo out/demo[/cyan]
    """
    from msk.core.config import load_config
    from msk.core.demo import DemoConfig, run_demo

    cfg = load_config(DemoConfig, config, n_images=n, image_size=image_size, serve=serve)
    run_demo(out_dir, cfg, say=out.print)


def main() -> None:
    """The ``msk`` entry point: MskError -> one line + exit 2; SIGTERM/SIGINT -> the Ray processes
    the command started are shut down, exit 128 + signal (``msk serve``: 0), see msk.core.runtime.shutdown."""
    from msk.core.runtime import shutdown

    shutdown.install()
    # DeepCluster's collapse is already one red console line per epoch; not again as a Python warning
    warnings.filterwarnings("ignore", message=r"epoch \d+: one cluster holds")
    signum = None
    try:
        from msk.core.registry import get_registry

        get_registry().add_commands(app)  # plugins' subcommands (hook msk_commands)
        app()
    except MskError as exc:
        from rich.markup import escape

        console.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)  # one line, never wrapped
        raise SystemExit(2) from None
    except BaseException as exc:
        signum = shutdown.signal_of(exc)
        if signum is None:
            raise
    finally:
        if signum is None:
            shutdown.stop_ray()
    if signum is not None:  # app() always ends in an exception (click's standalone mode)
        shutdown.exit_after_signal(signum, console.print)  # the exception is gone: its generators closed


if __name__ == "__main__":
    main()
