"""The `tunery` command: run the whole service or one part of it."""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Annotated

import typer

from shared.platform.settings import Settings, metrics_directory

app = typer.Typer(help="Tunery: self-hosted LLM fine-tuning.", no_args_is_help=True, add_completion=False)


def _settings(**overrides: object) -> Settings:
    settings = Settings()
    changes = {k: v for k, v in overrides.items() if v is not None}
    return settings.model_copy(update=changes) if changes else settings


def _setup(settings: Settings, service: str) -> Path:
    """Logging, and a fresh prometheus multiprocess folder (before prometheus_client is imported)."""
    logging.basicConfig(
        level=settings.log_level.upper(),
        format=f"%(asctime)s {service} %(levelname)s %(name)s: %(message)s",
    )
    directory = metrics_directory(settings, service)
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    return directory


@app.command()
def up(
    host: Annotated[str | None, typer.Option(help="API address [default: 127.0.0.1]")] = None,
    port: Annotated[int | None, typer.Option(help="API port [default: 8000]")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Data folder [default: ./.tunery]")] = None,
) -> None:
    """Run the API, a trainer, an evaluator, an inference worker (and Redis unless TUNERY_REDIS_URL is set)."""
    from cli.supervisor import SupervisorError, run_up

    settings = _settings(api_host=host, api_port=port, data_dir=data_dir)
    try:
        raise typer.Exit(run_up(settings))
    except SupervisorError as exc:
        typer.secho(str(exc), fg="red", err=True)
        raise typer.Exit(1) from exc


@app.command()
def api(
    host: Annotated[str | None, typer.Option(help="Address [default: TUNERY_API_HOST]")] = None,
    port: Annotated[int | None, typer.Option(help="Port [default: TUNERY_API_PORT]")] = None,
    workers: Annotated[int, typer.Option(help="uvicorn worker processes (metrics add up across them)")] = 1,
) -> None:
    """Run the API alone."""
    settings = _settings(api_host=host, api_port=port)
    _setup(settings, "api")
    import uvicorn

    if host is not None:
        os.environ["TUNERY_API_HOST"] = host  # read again by each worker process's settings
    if port is not None:
        os.environ["TUNERY_API_PORT"] = str(port)
    uvicorn.run(
        "services.api.app:app_from_settings",
        factory=True,
        host=settings.api_host,
        port=settings.api_port,
        workers=workers,
        # Event streams end by themselves on a stop; a request still open after this is cut.
        timeout_graceful_shutdown=5,
        # uvicorn's own loggers (its access log is INFO) follow TUNERY_LOG_LEVEL like the rest.
        log_level=settings.log_level.lower(),
    )


@app.command()
def trainer() -> None:
    """Run a trainer worker for the queue train:<TUNERY_GPU_CLASS>."""
    settings = _settings()
    metrics_dir = _setup(settings, "trainer")
    from services.trainer.worker import run_worker

    run_worker(settings, metrics_dir)


@app.command()
def evaluator(
    queue: Annotated[
        list[str] | None, typer.Option(help="Serve only these queues: prepare, eval [default: both]")
    ] = None,
) -> None:
    """Run an evaluator worker: data preparation and estimates (prepare), evaluations (eval)."""
    from shared.platform.queue import EVALUATOR_QUEUES  # not the worker module: metrics must wait for _setup

    unknown = set(queue or ()) - set(EVALUATOR_QUEUES)
    if unknown:
        choices = ", ".join(EVALUATOR_QUEUES)
        typer.secho(f"unknown queue {sorted(unknown)[0]!r}; choose from {choices}", fg="red", err=True)
        raise typer.Exit(2)
    settings = _settings()
    metrics_dir = _setup(settings, "evaluator")
    from services.evaluator.worker import run_worker

    run_worker(settings, metrics_dir, queue)


@app.command()
def inference() -> None:
    """Run an inference worker: chat completions and classifications to try models before exporting them."""
    settings = _settings()
    metrics_dir = _setup(settings, "inference")
    from services.inference.worker import run_worker

    run_worker(settings, metrics_dir)


keys_app = typer.Typer(
    help="Manage API keys (stored only as hashes; a key is shown once).", no_args_is_help=True
)
app.add_typer(keys_app, name="keys")


def _key_store(settings: Settings):
    from redis import Redis

    from shared.platform.api_keys import KeyStore

    url = settings.redis_url
    url_file = settings.data_dir / "redis" / "url"
    if url is None and url_file.exists():
        url = url_file.read_text().strip()
    if url is None:
        typer.secho(
            "No Redis: set TUNERY_REDIS_URL, or start `tunery up` in this data folder", fg="red", err=True
        )
        raise typer.Exit(2)
    return KeyStore(Redis.from_url(url), settings.api_key_secret)


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="The organization the key acts for")] = "org-default",
    role: Annotated[str, typer.Option(help="member or admin")] = "member",
    name: Annotated[str, typer.Option(help="A label for lists")] = "",
) -> None:
    """Create a key and print it (the only time it is shown)."""
    from shared.platform.api_keys import ROLES

    if role not in ROLES:
        typer.secho(f"role must be one of {', '.join(ROLES)}", fg="red", err=True)
        raise typer.Exit(2)
    record, plain = _key_store(_settings()).create(tenant, role, name)  # type: ignore[arg-type]
    typer.echo(plain)
    typer.secho(f"key {record.id}: tenant {record.tenant}, role {record.role}", err=True)


@keys_app.command("list")
def keys_list(tenant: Annotated[str | None, typer.Option(help="Only this organization")] = None) -> None:
    """List keys (ids, never the keys themselves)."""
    from rich.console import Console
    from rich.table import Table

    table = Table("id", "tenant", "role", "name", "created", "revoked")
    for key in _key_store(_settings()).list(tenant):
        table.add_row(key.id, key.tenant, key.role, key.name, str(key.created_at), str(key.revoked_at or ""))
    Console().print(table)


@keys_app.command("revoke")
def keys_revoke(key_id: str) -> None:
    """Revoke a key: requests with it answer 401 from now on."""
    if _key_store(_settings()).revoke(key_id) is None:
        typer.secho(f"no key {key_id}", fg="red", err=True)
        raise typer.Exit(1)
    typer.echo(f"revoked {key_id}")


def _client(settings: Settings, api_url: str | None):
    import httpx

    key = settings.api_key
    key_file = settings.data_dir / "api-key"
    if key is None and key_file.exists():
        key = key_file.read_text().strip()
    if key is None:
        typer.secho(
            "No API key: set TUNERY_API_KEY (or run in the data folder of `tunery up`)", fg="red", err=True
        )
        raise typer.Exit(2)
    url = api_url or f"http://{settings.api_host}:{settings.api_port}"
    return httpx.Client(
        base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=httpx.Timeout(30, read=None)
    )


ApiUrl = Annotated[
    str | None, typer.Option(help="Tunery's address [default: http://TUNERY_API_HOST:TUNERY_API_PORT]")
]


@app.command()
def status(
    limit: Annotated[int, typer.Option(help="How many recent jobs")] = 10,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Refresh every two seconds")] = False,
    api_url: ApiUrl = None,
) -> None:
    """Recent jobs with their progress, loss, throughput, ETA and cost (tab-separated when piped)."""
    from rich.live import Live

    from cli.monitor import console, one_line_errors, status_rows, status_table, status_tsv

    with _client(_settings(), api_url) as client, one_line_errors(str(client.base_url)):
        if not watch:
            rows = status_rows(client, limit)
            if console.is_terminal:
                console.print(status_table(rows))
            else:
                typer.echo(status_tsv(rows), nl=False)
            return
        with Live(status_table(status_rows(client, limit)), console=console, refresh_per_second=1) as live:
            while True:
                time.sleep(2)
                live.update(status_table(status_rows(client, limit)))


@app.command()
def logs(
    job_id: str,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Stream new events with a progress bar")
    ] = False,
    api_url: ApiUrl = None,
) -> None:
    """A job's events, oldest first; with -f, live until the job finishes (exit status 0 if it succeeded)."""
    from cli import monitor

    with _client(_settings(), api_url) as client, monitor.one_line_errors(str(client.base_url)):
        if not follow:
            monitor.print_events(client, job_id)
            return
        final = monitor.follow(client, job_id)
    monitor.console.print(f"job {job_id}: {final}")
    raise typer.Exit(0 if final == "succeeded" else 1)
