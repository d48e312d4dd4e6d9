"""`tunery status` and `tunery logs`: a job's progress in the terminal, read from the API.

What goes wrong (no such job, a refused key, a server that is down or stops while followed) is said in
one line on stderr with a non-zero exit status, never as a traceback: `MonitorError` and
`one_line_errors`.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator

import httpx
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TaskProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table

console = Console()

STATUS_COLUMNS = ("job", "model", "stage", "progress", "loss", "tokens/s", "ETA", "cost (USD)")


class MonitorError(Exception):
    """A problem the user can act on, said in one line."""


@contextlib.contextmanager
def one_line_errors(base_url: str) -> Iterator[None]:
    """Turn a MonitorError or a failure to talk to the server into one red line and exit status 1."""
    try:
        yield
    except MonitorError as exc:
        message = str(exc)
    except httpx.ConnectError as exc:
        message = f"cannot reach Tunery at {base_url} ({exc}); is it running?"
    except httpx.TransportError as exc:
        message = f"lost the connection to Tunery at {base_url} ({exc or type(exc).__name__})"
    else:
        return
    typer.secho(message, fg="red", err=True)
    raise typer.Exit(1)


def _checked(response: httpx.Response) -> httpx.Response:
    """The response when it succeeded; else a MonitorError with the API's own message."""
    if response.is_success:
        return response
    response.read()
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text[:200] or response.reason_phrase
    if response.status_code == 401:
        raise MonitorError(f"the API key was refused: {message} (set TUNERY_API_KEY to a valid key)")
    raise MonitorError(f"{message} (HTTP {response.status_code})")


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    value = int(value)
    return (
        f"{value // 3600}h{value % 3600 // 60:02d}m" if value >= 3600 else f"{value // 60}m{value % 60:02d}s"
    )


def status_rows(client: httpx.Client, limit: int) -> list[tuple[str, ...]]:
    """The `limit` most recent jobs, one row of STATUS_COLUMNS each."""
    jobs = _checked(client.get("/v1/fine_tuning/jobs", params={"limit": limit})).json()["data"]
    now = time.time()
    rows = []
    for job in jobs:
        progress = job["progress"]
        total = progress.get("total_steps") or 0
        done = f"{progress['step']}/{total}" if total else "-"
        eta = job["estimated_finish"] - now if job.get("estimated_finish") else None
        loss = progress.get("train_loss")
        speed = progress.get("tokens_per_second")
        rows.append((
            job["id"], job["model"], job["stage"], done,
            f"{loss:.4f}" if loss is not None else "-",
            f"{speed:,.0f}" if speed else "-",
            _seconds(eta), f"{job['usage']['cost_usd']:.4f}",
        ))  # fmt: skip
    return rows


def status_table(rows: list[tuple[str, ...]]) -> Table:
    """For a terminal: however narrow, the job ids stay whole (other columns wrap) so they can be copied."""
    table = Table()
    table.add_column(STATUS_COLUMNS[0], no_wrap=True, min_width=max((len(row[0]) for row in rows), default=0))
    for name in STATUS_COLUMNS[1:]:
        table.add_column(name)
    for row in rows:
        table.add_row(*row)
    return table


def status_tsv(rows: list[tuple[str, ...]]) -> str:
    """For a pipe or a file: tab-separated, a header line then a line a job, nothing cut."""
    return "".join("\t".join(row) + "\n" for row in [STATUS_COLUMNS, *rows])


def _sse(lines: Iterator[str]) -> Iterator[tuple[str | None, dict]]:
    name = None
    for line in lines:
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            yield name, json.loads(line.removeprefix("data: "))
            name = None


def follow(client: httpx.Client, job_id: str) -> str:
    """Print the job's events as they happen, with a progress bar; returns its final status.

    MonitorError when the job does not exist or the server stops before the job ends.
    """
    columns = (
        TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(),
        TextColumn("loss {task.fields[loss]}  {task.fields[speed]} tok/s  ${task.fields[cost]}"),
        TimeRemainingColumn(),
    )  # fmt: skip
    stopped = f"the server stopped while following job {job_id}; run `tunery logs -f {job_id}` again once it is back"
    with client.stream("GET", f"/v1/fine_tuning/jobs/{job_id}/events", params={"stream": "true"}) as stream:
        _checked(stream)  # before the bar, which would leave an empty line behind
        with Progress(*columns, console=console) as bar:
            task = bar.add_task(job_id, total=None, loss="-", speed="-", cost="0")
            try:
                for name, data in _sse(stream.iter_lines()):
                    if name == "end":
                        if data["status"] == "server_stopping":
                            raise MonitorError(stopped)
                        return data["status"]
                    _show(bar, task, client, job_id, data)
            except httpx.TransportError as exc:
                raise MonitorError(stopped) from exc
    raise MonitorError(stopped)  # the stream ended without saying how the job ended


def _show(bar: Progress, task: TaskID, client: httpx.Client, job_id: str, data: dict) -> None:
    """One event: a metrics event moves the bar, any other is printed above it."""
    if data.get("type") == "metrics":
        metrics = data["data"]
        cost = _checked(client.get(f"/v1/fine_tuning/jobs/{job_id}")).json()["usage"]["cost_usd"]
        bar.update(
            task, completed=metrics["step"], total=metrics["total_steps"],
            loss=f"{metrics['train_loss']:.4f}", speed=f"{metrics['tokens_per_second']:,.0f}",
            cost=f"{cost:.4f}",
        )  # fmt: skip
        return
    when = time.strftime("%H:%M:%S", time.localtime(data["created_at"]))
    style = {"warn": "yellow", "error": "red"}.get(data["level"], "")
    bar.console.print(
        f"[dim]{when}[/] [{style}]{data['message']}[/]" if style else f"[dim]{when}[/] {data['message']}"
    )


def print_events(client: httpx.Client, job_id: str) -> None:
    """The job's latest 1,000 events, oldest first."""
    page = _checked(client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 1000})).json()
    for event in reversed(page["data"]):
        when = time.strftime("%H:%M:%S", time.localtime(event["created_at"]))
        console.print(f"[dim]{when}[/] {event['message']}")
