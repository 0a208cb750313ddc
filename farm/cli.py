"""The `farm` command line.

Exit codes, for scripts:
  0  done (for run / submit --wait: every image stored)
  1  the job finished with failed items
  2  bad input: the spec or an argument is invalid (nothing was queued)
  3  a service did not answer or refused access (Redis, the store)
  4  no such job
  130 interrupted
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from farm import keys
from farm.errors import (
    BrokerAccessDenied,
    BrokerUnavailable,
    FarmError,
    JobNotFound,
    PermanentError,
    RetriableError,
    SpecError,
    StoreAccessDenied,
)
from farm.connections import connect
from farm.jobs import JobBoard, JobState, JobStatus
from farm.settings import Settings
from farm.spec import load_spec

app = typer.Typer(help="farm: a distributed render farm for Stable Diffusion.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
# No emoji codes: a prompt's "<lora:x:1>" must print as written, not with ":x:" as an emoji.
console = Console(stderr=True, emoji=False)
out = Console(soft_wrap=True, emoji=False)

EXIT_DONE, EXIT_FAILURES, EXIT_BAD_INPUT, EXIT_SERVICE, EXIT_NOT_FOUND = 0, 1, 2, 3, 4

BrokerOpt = typer.Option(None, "--broker", help="Redis URL [env: FARM_BROKER_URL]")
StoreOpt = typer.Option(None, "--store", help="s3://bucket/prefix or a folder [env: FARM_STORE]")
EndpointOpt = typer.Option(None, "--endpoint-url", help="S3 endpoint [env: AWS_ENDPOINT_URL]")


def _settings(broker=None, store=None, endpoint=None) -> Settings:
    return Settings.from_env().with_overrides(broker_url=broker, store=store, s3_endpoint_url=endpoint)


def _fail(code: int, message: str) -> typer.Exit:
    console.print(f"[red]error:[/red] {message}", highlight=False)
    return typer.Exit(code)


@contextmanager
def _errors():
    """Turn farm's errors into one-line reasons and the documented exit codes."""
    try:
        yield
    except SpecError as e:
        console.print("[red]invalid job spec:[/red]", highlight=False)
        for field, reason in e.problems:
            console.print(f"  {field}: {reason}", highlight=False, markup=False)
        raise typer.Exit(EXIT_BAD_INPUT)
    except JobNotFound as e:
        raise _fail(EXIT_NOT_FOUND, str(e))
    except (StoreAccessDenied, BrokerAccessDenied, RetriableError) as e:
        raise _fail(EXIT_SERVICE, str(e))
    except (PermanentError, ValueError, FarmError) as e:
        raise _fail(EXIT_BAD_INPUT, str(e))
    except KeyboardInterrupt:
        raise typer.Exit(130)


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        # A few redraws a second: on a worker host, every wake-up takes a core from the render.
        console=console, transient=False, refresh_per_second=4,
    )


def _follow_with_bar(board: JobBoard, job_id: str, total: int) -> JobStatus:
    from dispatcher.follow import follow

    with _progress() as bar:
        task = bar.add_task(job_id, total=total, detail="")

        def update(s: JobStatus) -> None:
            detail = f"running {s.running}, failed {s.failed}" if s.failed else f"running {s.running}"
            if s.state is JobState.PAUSED:
                detail += " (paused)"
            # Steps of the chunks being rendered count as fractions of their items.
            bar.update(task, completed=s.done + s.failed + s.partial, detail=detail)

        return follow(board, job_id, update, interval=0.5)


def _finish_code(status: JobStatus) -> int:
    if status.state is JobState.DONE:
        return EXIT_DONE
    for index, reason in sorted(status.failures.items())[:10]:
        console.print(f"  item {index}: {reason}", highlight=False, markup=False)
    return EXIT_FAILURES


@app.command()
def run(
    spec: Path = typer.Argument(..., help="job spec (TOML, or JSON by its .json name)"),
    out_dir: Path = typer.Option(Path("farm-out"), "--out", help="folder to write the job's outputs into"),
    gpus: str = typer.Option("all", help="GPUs for the embedded workers: all, none, or a list such as 0,1"),
    serve: bool = typer.Option(False, "--serve", help="open the dashboard on 127.0.0.1 while the job runs, and "
                                                      "after, until Ctrl-C (no auth: this host only)"),
    port: int = typer.Option(7860, help="with --serve: the dashboard's port"),
    amqp: Optional[str] = typer.Option(None, "--amqp", help="a RabbitMQ URL (amqp://...) to use as the broker; "
                                                            "the job state stays in the private Redis"),
):
    """Render a job on this machine: a private Redis and real worker processes, outputs in a folder."""
    from farm.embedded import EmbeddedFarm

    with _errors():
        job = load_spec(spec, Settings.from_env().allow_pickle)
        create_app = _serve_extra()[1] if serve else None
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="farm-run-") as tmp:
            # The worker loads the job's (first) model as it starts, before its first chunk; it
            # starts first, so what this process does next happens while it loads.
            first_model = job.grid.get("model", [job.model])[0]
            settings = Settings.from_env().with_overrides(store=str(out_dir.resolve()), preload=(first_model,))
            farm = EmbeddedFarm(settings, Path(tmp), gpus=gpus, name=f"run-{os.getpid()}",
                                broker=amqp).start(wait=False)
            from dispatcher.submit import submit

            with farm:
                # Queued while the worker starts: the dispatcher hands it out the moment it joins.
                submitted = submit(job, farm.settings)
                console.print(f"job [bold]{submitted.job_id}[/bold]: {submitted.items} images "
                              f"in {submitted.chunks} batches", highlight=False)
                dashboard = _open_dashboard(create_app(farm.settings, auth=False), port, submitted.job_id) \
                    if serve else None
                with console.status("starting a worker (loads torch and the model)..."):
                    farm.wait_ready()
                status = _follow_with_bar(farm.board, submitted.job_id, submitted.items)
                if job.export is not None and status.state is not JobState.CANCELLED:
                    _wait_export(farm.board, submitted.job_id)
                job_dir = out_dir / submitted.job_id
                _write_grid(job_dir)
                typer.echo(str(job_dir))
                if dashboard is not None:
                    _serve_until_interrupted(dashboard, port)
                # The job has ended and all of it is stored: no warm shutdown to wait for.
                farm.stop(kill=True)
        raise typer.Exit(_finish_code(status))


def _wait_export(board: JobBoard, job_id: str) -> None:
    """The embedded dispatcher exports the job as its spec's [export] asks; wait for it."""
    with console.status("exporting the job as its [export] asks..."):
        while (state := board.header(job_id).export_state) in ("queued", "running", ""):
            time.sleep(0.25)
    console.print(f"export {state}", highlight=False, markup=False)


def _serve_extra():
    """uvicorn and the app factory, or a clear error naming the extra to install."""
    try:
        import uvicorn

        from dispatcher.api import create_app
    except ImportError as e:
        raise ValueError(f"serving needs its extra: pip install 'farm[serve]' ({e.name} is missing)") from None
    return uvicorn, create_app


def _open_dashboard(api, port: int, job_id: str):
    from dispatcher.api import BackgroundServer

    dashboard = BackgroundServer(api, "127.0.0.1", port).start()
    console.print(f"dashboard: http://127.0.0.1:{port}/jobs/{job_id} (no auth: this host only)", highlight=False)
    return dashboard


def _serve_until_interrupted(dashboard, port: int) -> None:
    # Handlers of its own: Python leaves SIGINT ignored when the process started with it ignored
    # (a background job of a script), and the line below promises that Ctrl-C stops it.
    interrupted = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: interrupted.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        console.print(f"the dashboard stays up on http://127.0.0.1:{port}; Ctrl-C to stop", highlight=False)
        while dashboard.thread.is_alive() and not interrupted.wait(0.5):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    dashboard.stop()


def _write_grid(job_dir: Path) -> None:
    """The job's grid.png, or why there is none."""
    from farm.grids import GridError, write_job_grid

    try:
        path = write_job_grid(job_dir)
    except GridError as e:
        console.print(f"no grid.png: {e} (farm grid draws parts of it)", highlight=False, markup=False)
        return
    if path is not None:
        console.print(f"grid: {path}", highlight=False)


@app.command()
def submit(
    spec: Optional[Path] = typer.Argument(None, help="job spec (TOML, or JSON by its .json name)"),
    from_image: Optional[Path] = typer.Option(None, "--from-image", help="make the job from a PNG's parameters"),
    model: Optional[str] = typer.Option(None, help="with --from-image: the model to use (a path)"),
    wait: bool = typer.Option(False, "--wait", help="follow the job with a progress bar until it ends"),
    user: Optional[str] = typer.Option(None, help="who the job is for (default: your login name)"),
    lane: Optional[str] = typer.Option(None, help="interactive (served first) or batch [default: the spec's, "
                                                  "else batch]"),
    priority: Optional[int] = typer.Option(None, help="-100..100; higher runs first within the lane [default: 0]"),
    broker: Optional[str] = BrokerOpt,
    store: Optional[str] = StoreOpt,
    endpoint_url: Optional[str] = EndpointOpt,
):
    """Queue a job on the pool; print its id."""
    from dispatcher.service import is_running
    from dispatcher.submit import submit as do_submit

    with _errors():
        settings = _settings(broker, store, endpoint_url)
        board = _board(settings)
        job = _spec_from_args(spec, from_image, model, settings.allow_pickle)
        submitted = do_submit(job, settings, user=user, lane=lane, priority=priority)
        typer.echo(submitted.job_id)
        if not is_running(board.redis):
            console.print("[yellow]note:[/yellow] no dispatcher is running; the job waits until one starts "
                          "(`farm dispatcher`)", highlight=False)
        if wait:
            status = _follow_with_bar(board, submitted.job_id, submitted.items)
            raise typer.Exit(_finish_code(status))


def _spec_from_args(spec: Optional[Path], from_image: Optional[Path], model: Optional[str], allow_pickle: bool):
    from farm.reproduce import spec_from_image
    from farm.spec import parse_spec

    if (spec is None) == (from_image is None):
        raise ValueError("give a spec file or --from-image IMAGE.png (one of them)")
    if from_image is None:
        return load_spec(spec, allow_pickle)
    try:
        data = from_image.read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read {from_image}: {e.strerror or e}") from None
    return parse_spec(spec_from_image(data, model), allow_pickle=allow_pickle)


def _board(settings: Settings) -> JobBoard:
    """The job board on the settings' job-state Redis; SettingMissing when none is set."""
    return JobBoard(connect(settings))


def _eta(status: JobStatus) -> str:
    eta = status.eta_seconds
    if status.finished:
        return "-"
    if eta is None:
        return "unknown"
    return time.strftime("%H:%M:%S", time.gmtime(eta))


@app.command()
def status(
    job_id: str = typer.Argument(..., help="job id, as submit printed it"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    watch: bool = typer.Option(False, "--watch", help="a live progress bar until the job ends"),
    broker: Optional[str] = BrokerOpt,
):
    """Show a job's counts (queued, running, done, failed), ETA and failed items."""
    with _errors():
        board = _board(_settings(broker))
        s = board.status(job_id)
        if watch and not s.finished:
            s = _follow_with_bar(board, job_id, s.total)
        if as_json:
            out.print_json(json.dumps(s.summary()))
            return
        title = f"{s.job_id}: {s.state.value} ({s.user}, {s.lane} lane, priority {s.priority})"
        table = Table(title=title, show_header=True)
        for column in ("total", "queued", "running", "done", "failed", "ETA"):
            table.add_column(column, justify="right")
        table.add_row(str(s.total), str(s.queued), str(s.running), str(s.done), str(s.failed), _eta(s))
        out.print(table)
        if s.export_state:
            out.print(f"export: {s.export_state}", highlight=False, markup=False)
        for index, reason in sorted(s.failures.items())[:20]:
            out.print(f"item {index}: {reason}", highlight=False, markup=False)


@app.command()
def results(
    job_id: str = typer.Argument(...),
    out_dir: Path = typer.Option(Path("."), "--out", help="folder to download into (job in a sub-folder)"),
    urls: bool = typer.Option(False, "--urls", help="print presigned download URLs instead of downloading"),
    expires: str = typer.Option("1h", "--expires", help="with --urls: how long they work (3600, 30m, 1h, 7d)"),
    broker: Optional[str] = BrokerOpt,
    store: Optional[str] = StoreOpt,
    endpoint_url: Optional[str] = EndpointOpt,
):
    """Download a job's images, job.json and manifest.jsonl, or share them by presigned URL."""
    from dispatcher.results import download, parse_duration, share

    with _errors():
        settings = _settings(broker, store, endpoint_url)
        source = _job_store(_board(settings) if settings.broker_url else None, job_id, settings)
        if urls:
            seconds = parse_duration(expires)
            for key, url in share(source, job_id, seconds):
                typer.echo(f"{key}\t{url}")
            return
        with _progress() as bar:
            task = bar.add_task("downloading", total=None, detail="")
            files = download(source, job_id, out_dir, on_file=lambda _k: bar.advance(task))
        images = sum(1 for f in files if "/images/" in f)
        _write_grid(out_dir / job_id)
        out.print(f"{images} images in {out_dir / job_id}", highlight=False)


@app.command("export")
def export_job(
    job_id: str = typer.Argument(...),
    dest: str = typer.Argument(..., help="a folder, or s3://bucket/prefix (the store's credentials)"),
    fmt: str = typer.Option(..., "--format", help="imagefolder, webdataset or parquet"),
    shard_size: int = typer.Option(10_000, "--shard-size", help="images per shard (webdataset, parquet)"),
    shard_bytes: Optional[str] = typer.Option(None, "--shard-bytes",
                                              help="start a new shard past this many image bytes (500MB, 1GB)"),
    resume: bool = typer.Option(False, "--resume", help="skip the shards (and images) a killed run finished"),
    broker: Optional[str] = BrokerOpt,
    store: Optional[str] = StoreOpt,
    endpoint_url: Optional[str] = EndpointOpt,
):
    """Export a job's images as a dataset: imagefolder (Hugging Face datasets), WebDataset shards or
    Parquet. A job still running exports what is done."""
    from farm import export as exporting
    from farm.store import open_store
    from farm.stored import StoredJob

    with _errors():
        settings = _settings(broker, store, endpoint_url)
        source = _job_store(_board(settings) if settings.broker_url else None, job_id, settings)
        job = StoredJob(source, job_id)
        target = open_store(dest, settings)
        limit = exporting.parse_size(shard_bytes) if shard_bytes else None
        with _progress() as bar:
            task = bar.add_task("exporting", total=job.done_count, detail=fmt)
            report = exporting.export(job, target, fmt, shard_size=shard_size, shard_bytes=limit, resume=resume,
                                      on_row=lambda n: bar.update(task, completed=n))
        _say_export(report)


def _say_export(report) -> None:
    shards = f" ({len(report.written)} written, {len(report.skipped)} already there)" if report.skipped else ""
    out.print(f"exported {report.exported} of {report.total} images to {report.dest} as {report.format}{shards}",
              highlight=False)
    if report.missing:
        out.print(f"{report.missing} images are not rendered yet: export again when the job has ended",
                  highlight=False)
    if report.failed:
        out.print(f"{report.failed} items failed: their reasons are in failed.jsonl", highlight=False)


@app.command()
def grid(
    job_id: str = typer.Argument(...),
    x: Optional[list[str]] = typer.Option(None, "--x", help="axis across: a grid axis of the spec, seed or prompt"),
    y: Optional[list[str]] = typer.Option(None, "--y", help="axis down (axes no side names are added here)"),
    z: Optional[list[str]] = typer.Option(None, "--z", help="one grid per value, side by side"),
    where: Optional[list[str]] = typer.Option(None, "--where", help="AXIS=VALUE: only the images with this value"),
    out_file: Path = typer.Option(Path("grid.png"), "--out", help="the PNG to write"),
    max_side: int = typer.Option(4096, "--max-side", help="largest width or height of the grid, in pixels"),
    broker: Optional[str] = BrokerOpt,
    store: Optional[str] = StoreOpt,
    endpoint_url: Optional[str] = EndpointOpt,
):
    """Draw a job's images as the webui's X/Y/Z plot, with each axis' values on the edges. A job
    still running is drawn with its missing images as empty cells."""
    from farm import grids
    from farm.stored import StoredJob

    with _errors():
        settings = _settings(broker, store, endpoint_url)
        job = StoredJob(_job_store(_board(settings) if settings.broker_url else None, job_id, settings), job_id)
        fixed = dict(_axis_value(w) for w in where or [])
        sides = grids.sides(job, x=x, y=y, z=z, where=fixed)
        picture, layout = grids.draw(job, *sides, max_side=max_side)
        picture.save(out_file)
        missing = sum(not stored for _, _, stored in layout.cells)
        note = f", {missing} missing" if missing else ""
        out.print(f"{out_file}: {len(layout.cells)} images{note}, {picture.width}x{picture.height}", highlight=False)


def _axis_value(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep:
        raise ValueError(f"--where {text}: write AXIS=VALUE")
    return name.strip(), value.strip()


@app.command()
def explain(
    spec: Path = typer.Argument(..., help="job spec (TOML, or JSON by its .json name)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    broker: Optional[str] = BrokerOpt,
):
    """A dry run: items, chunks and batch sizes, models and LoRA sets, the timesteps each sampler
    visits, and an estimate of GPU time. Needs no GPU; Redis only for the pool's measured pace."""
    from farm import explain as explaining
    from farm.plan import Plan

    with _errors():
        settings = _settings(broker)
        plan = Plan(load_spec(spec, settings.allow_pickle).with_resolved_seeds(), "explain")
        pace = None
        if settings.broker_url:
            try:
                pace = explaining.read_pace(connect(settings))
            except (BrokerUnavailable, BrokerAccessDenied) as e:
                console.print(f"Redis did not answer ({e}); estimating from farm's own figures", highlight=False)
        result = explaining.explain(plan, pace)
        note = explaining.add_timesteps(result)
        if as_json:
            out.print_json(json.dumps({**result.to_json(), "timesteps_note": note}))
            return
        _say_explanation(result, note)


def _say_explanation(result, note: str | None) -> None:
    sizes = ", ".join(f"{count} of {size}" for size, count in result.batch_sizes.items())
    out.print(f"{result.items} images in {result.chunks} chunks ({sizes})", highlight=False)
    out.print(f"models: {len(result.models)} ({', '.join(result.models)}); at best {result.model_loads} "
              f"load{'s' if result.model_loads > 1 else ''}, {result.model_loads - 1} switches on one worker",
              highlight=False, markup=False)
    if result.lora_sets:
        out.print(f"LoRA sets: {len(result.lora_sets)} ({'; '.join(result.lora_sets)})", highlight=False,
                  markup=False)
    for entry in result.runs:
        run = entry["run"]
        what = f"{run['sampler']} ({run['schedule_type']}), {run['steps']} steps, {run['mode']}"
        if run["strength"] is not None:
            what += f" at strength {run['strength']:g}"
        if "timesteps" in entry:
            shown = ", ".join(f"{t:g}" if t == int(t) else f"{t:.2f}" for t in entry["timesteps"])
            out.print(f"{what}: {entry['items']} images, {len(entry['timesteps'])} model evaluations at "
                      f"timesteps [{shown}]", highlight=False, markup=False)
        else:
            out.print(f"{what}: {entry['items']} images ({entry.get('error') or note})", highlight=False,
                      markup=False)
    if result.seconds is not None:
        out.print(f"GPU time: about {_duration(result.seconds)} (from {result.pace_source})", highlight=False)
    if result.unestimated:
        out.print(f"no measured pace for {', '.join(result.unestimated)}: run a few images of it on the pool first",
                  highlight=False, markup=False)


def _duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


@app.command()
def worker(
    gpus: str = typer.Option("all", help="all, none (one CPU worker), or a list such as 0,1"),
    broker: Optional[str] = BrokerOpt,
    name: Optional[str] = typer.Option(None, help="host part of the worker names"),
    metrics_port: Optional[int] = typer.Option(None, "--metrics-port",
                                               help="serve Prometheus metrics (this host's workers) on this port"),
):
    """Start one worker process per GPU on this host (one CPU worker without GPUs)."""
    settings = _settings(broker)
    with _errors():
        settings.require_broker()
        if metrics_port is not None:
            from farm import metrics

            metrics.require()
    env = {**os.environ, **settings.to_env()}
    args = [sys.executable, "-m", "workers.supervisor", "--gpus", gpus] + (["--name", name] if name else [])
    args += ["--metrics-port", str(metrics_port)] if metrics_port is not None else []
    os.execve(sys.executable, args, env)


def _job_store(board: JobBoard | None, job_id: str, settings: Settings):
    """The store a job writes to: from its state in Redis, else FARM_STORE / --store."""
    from farm.store import open_store

    keys.check_job_id(job_id)
    try:
        url = board.header(job_id).store if board is not None else settings.require_store()
    except JobNotFound:
        if not settings.store:
            raise JobNotFound(f"no job {job_id!r} in Redis; give its store with FARM_STORE or --store") from None
        url = settings.store
    return open_store(url, settings)


@app.command()
def cancel(job_id: str = typer.Argument(...), broker: Optional[str] = BrokerOpt, store: Optional[str] = StoreOpt,
           endpoint_url: Optional[str] = EndpointOpt):
    """Stop a job: no new items start, running ones stop at their next step; stored images stay."""
    from dispatcher import control

    with _errors():
        settings = _settings(broker, store, endpoint_url)
        board = _board(settings)
        before = control.cancel(board, _job_store(board, job_id, settings), job_id)
        s = board.status(job_id)
        out.print(f"{job_id}: cancelled (was {before.value}); {s.done} of {s.total} images stored", highlight=False)


@app.command()
def pause(job_id: str = typer.Argument(...), broker: Optional[str] = BrokerOpt):
    """Hold a job: running items finish, no new ones start until `farm resume`."""
    from dispatcher import control

    with _errors():
        control.pause(_board(_settings(broker)), job_id)
        out.print(f"{job_id}: paused", highlight=False)


@app.command()
def resume(job_id: str = typer.Argument(...), broker: Optional[str] = BrokerOpt, store: Optional[str] = StoreOpt,
           endpoint_url: Optional[str] = EndpointOpt):
    """Resume a paused job, or rebuild one Redis lost (or that ended) from its store: only what is
    missing is rendered."""
    from dispatcher import control

    with _errors():
        settings = _settings(broker, store, endpoint_url)
        board = _board(settings)
        outcome = control.resume(board, _job_store(board, job_id, settings), job_id)
        if isinstance(outcome, control.Rebuilt):
            out.print(f"{job_id}: rebuilt from the store; {outcome.already_stored} of {outcome.total} images "
                      f"already there, {outcome.total - outcome.already_stored} to render", highlight=False)
        else:
            out.print(f"{job_id}: resumed (was {outcome.value})", highlight=False)


@app.command()
def priority(job_id: str = typer.Argument(...), value: int = typer.Argument(..., help="-100..100, higher first"),
             broker: Optional[str] = BrokerOpt):
    """Change a job's priority; it applies to the next chunk handed out."""
    from dispatcher import control
    from dispatcher.submit import check_placement

    with _errors():
        board = _board(_settings(broker))
        check_placement(None, value)
        control.set_priority(board, job_id, value)
        out.print(f"{job_id}: priority {value}", highlight=False)


@app.command()
def workers(
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    broker: Optional[str] = BrokerOpt,
):
    """List the pool's workers: host, GPU, models held, current item, images/min, last heartbeat."""
    from farm import pool

    with _errors():
        settings = _settings(broker)
        views = pool.read(_board(settings).redis, settings.queue)
        now = time.time()
        rows = [w.summary(now) for w in views]
        if as_json:
            out.print_json(json.dumps({"workers": rows, "model_loads": sum(w.loads for w in views)}))
            return
        table = Table(title=f"{len(views)} workers, {sum(w.loads for w in views)} model loads")
        for column in ("worker", "host", "GPU", "models", "loads", "current", "images", "img/min", "heartbeat"):
            table.add_column(column)
        for w in views:
            current = "idle"
            if w.current:
                c = w.current
                current = f"{c['job']} #{c['chunk']} ({c['items']} img) step {c.get('step', 0)}/{c.get('steps', '?')}"
            table.add_row(w.name, w.host, w.device or w.gpu, ", ".join(Path(m).name for m in w.models) or "-",
                          str(w.loads), current, str(w.images), f"{w.images_per_minute:.1f}",
                          f"{now - w.heartbeat:.0f}s ago")
        out.print(table)


@app.command()
def dispatcher(broker: Optional[str] = BrokerOpt,
               metrics_port: Optional[int] = typer.Option(None, "--metrics-port",
                                                          help="serve Prometheus metrics (the pool's) on this port")):
    """Run the dispatcher: it hands chunks to workers a few at a time (lanes, fair share, affinity)."""
    import logging

    from dispatcher.service import serve

    with _errors():
        settings = _settings(broker)
        settings.require_broker()
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
        if metrics_port is not None:
            from farm import metrics

            metrics.serve_process_metrics(metrics_port, connect(settings))
            console.print(f"metrics on http://0.0.0.0:{metrics_port}/metrics", highlight=False)
        console.print(f"dispatcher feeding queues {settings.queue}.<worker>; Ctrl-C to stop", highlight=False)
        serve(settings)


@app.command()
def health(
    role: str = typer.Argument(..., help="worker or dispatcher"),
    name: Optional[str] = typer.Option(None, help="worker: the host part of its worker names (default: this host)"),
    broker: Optional[str] = BrokerOpt,
):
    """A probe for containers and Kubernetes: exit 0 when this host's workers beat their heartbeat
    (worker), or when a dispatcher is running (dispatcher); 1 with the reason otherwise."""
    import socket

    from farm import pool

    with _errors():
        settings = _settings(broker)
        settings.require_broker()
        client = connect(settings, socket_timeout=5)
        if role == "dispatcher":
            problem = None if client.exists(keys.DISPATCHER) else "no dispatcher has checked in"
        elif role == "worker":
            host = name or socket.gethostname()
            mine = [w for w in pool.read(client, settings.queue) if w.name.endswith(f"@{host}")]
            late = [w.name for w in mine if time.time() - w.heartbeat > 3 * settings.lease_renew_interval + 2]
            problem = (f"no worker of {host} is ready" if not mine else
                       f"no heartbeat from {', '.join(late)}" if late else None)
        else:
            raise ValueError(f"health: worker or dispatcher, got {role!r}")
    if problem:
        console.print(problem, highlight=False)
        raise typer.Exit(1)
    out.print("ok")


@app.command()
def drain(
    name: Optional[str] = typer.Option(None, help="the host part of the worker names (default: this host)"),
    broker: Optional[str] = BrokerOpt,
):
    """Give this host's workers no new chunk (a pod's preStop, maintenance); the chunk each renders
    finishes, SIGTERM then stops them, and what was queued for them goes to the others."""
    import socket

    from farm import pool

    with _errors():
        settings = _settings(broker)
        settings.require_broker()
        client = connect(settings, socket_timeout=5)
        host = name or socket.gethostname()
        names = [w.name for w in pool.read(client, settings.queue) if w.name.endswith(f"@{host}")]
        pool.drain(client, names)
    out.print(f"draining {', '.join(names) or 'no worker'}", highlight=False)


@app.command()
def info(image: Path = typer.Argument(..., help="a PNG the farm (or the webui) made")):
    """Print an image's generation parameters, parsed as the webui's PNG Info does."""
    from farm import infotext, png

    with _errors():
        try:
            text = png.read_parameters(image.read_bytes())
        except OSError as e:
            raise ValueError(f"cannot read {image}: {e}") from None
        if text is None:
            raise ValueError(f"{image} has no 'parameters' text")
        out.print_json(json.dumps(infotext.parse(text), ensure_ascii=False))


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", help="address to listen on (0.0.0.0: every interface)"),
    port: int = typer.Option(7860, help="port (7860 is the webui's)"),
    no_auth: bool = typer.Option(False, "--no-auth", help="no tokens: every request is an admin (one trusted host)"),
    broker: Optional[str] = BrokerOpt,
    store: Optional[str] = StoreOpt,
    endpoint_url: Optional[str] = EndpointOpt,
):
    """Serve the REST API (/v1, OpenAPI at /docs) on the pool's Redis and store."""
    with _errors():
        uvicorn, create_app = _serve_extra()
        settings = _settings(broker, store, endpoint_url)
        api = create_app(settings, auth=not no_auth)
        if no_auth:
            console.print("[bold red]warning:[/bold red] --no-auth: anyone who reaches "
                          f"{host}:{port} controls every job on this pool", highlight=False)
        console.print(f"farm API on http://{host}:{port} (docs at /docs); Ctrl-C to stop", highlight=False)
        uvicorn.run(api, host=host, port=port, log_level="info")


token_app = typer.Typer(help="API tokens for farm serve.", no_args_is_help=True)
app.add_typer(token_app, name="token")


@token_app.command("create")
def token_create(
    user: str = typer.Option(..., help="whose token (it sees and controls this user's jobs)"),
    admin: bool = typer.Option(False, "--admin", help="sees and controls every user's jobs"),
    broker: Optional[str] = BrokerOpt,
):
    """Make a token and print it, once: only its SHA-256 is kept."""
    from dispatcher.submit import check_user
    from farm.tokens import TokenBook

    with _errors():
        typer.echo(TokenBook(_board(_settings(broker)).redis).create(check_user(user), admin=admin))


@token_app.command("revoke")
def token_revoke(token: str = typer.Argument(...), broker: Optional[str] = BrokerOpt):
    """Revoke a token: requests carrying it answer 401 from now on."""
    from farm.tokens import TokenBook

    with _errors():
        TokenBook(_board(_settings(broker)).redis).revoke(token)
        console.print("revoked", highlight=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
