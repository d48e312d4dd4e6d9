"""The web console and the API docs: served by the API itself, with nothing fetched from the internet."""

from __future__ import annotations

import json
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from axe_playwright_python.sync_playwright import Axe
from playwright.sync_api import Page, expect

from tests.api_fixtures import ADMIN_KEY, IDENTITY_CHAT
from tests.conftest import CATALOG
from tests.live import LiveTunery
from tests.served_api import client, served_app

FIXTURES = Path(__file__).parent / "fixtures"
served = served_app  # the fixture: the API alone, for the upload test
EXTERNAL_URL = re.compile(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", re.IGNORECASE)


def test_the_api_docs_load_swagger_ui_from_the_service_itself(api):
    page = api.get("/docs")
    assert page.status_code == 200
    html = page.text
    assert not EXTERNAL_URL.search(html), html
    assert "https://" not in html and "http://" not in html
    assets = re.findall(r"""(?:src|href)="(/[^"]+)\"""", html)
    assert {a.rsplit("/", 1)[-1] for a in assets} == {
        "swagger-ui.css",
        "swagger-ui-bundle.js",
        "favicon-32x32.png",
        "docs.js",  # starts Swagger UI: no inline script, so the page's CSP can refuse them all
    }
    for asset in assets:
        assert api.get(asset).status_code == 200, asset
    # The spec it shows, and no validator badge that would post the spec to validator.swagger.io.
    start = api.get("/console/docs.js").text
    assert 'url: "/openapi.json"' in start and "validatorUrl: null" in start
    assert api.get("/openapi.json").status_code == 200


def test_redoc_is_not_offered_because_it_would_load_from_a_cdn(api):
    assert api.get("/redoc").status_code == 404


def test_the_root_and_console_paths_lead_to_the_console_page(api):
    root = api.get("/", follow_redirects=False)
    assert root.status_code in (302, 307) and root.headers["location"] == "/console/"
    bare = api.get("/console", follow_redirects=False)
    assert bare.status_code in (301, 307) and bare.headers["location"].endswith("/console/")
    page = api.get("/console/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")


# -- in a real browser --------------------------------------------------------------------------------

CHROMIUM = Path("/usr/bin/chromium")
AXE = Axe()
WCAG_AA = {"runOnly": {"type": "tag", "values": ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa"]}}
BROKEN_FILE = FIXTURES / "broken" / "wrong_role.jsonl"  # line 11: messages[2].role "assitant"
GOOD_FILE = IDENTITY_CHAT


@pytest.fixture
def live(live_factory, redis_url: str, tmp_path: Path) -> LiveTunery:
    """A live Tunery whose catalog holds only models its workers have: the shared test catalog's model
    without weights answers its size with an error, which the browser would log (the console shows it)."""
    catalog = tmp_path / "console-catalog.yaml"
    catalog.write_text(CATALOG.split("  missing-weights:")[0])
    return live_factory(redis_url, {"TUNERY_MODEL_CATALOG": str(catalog)})


@pytest.fixture
def browser():
    if not CHROMIUM.exists():
        pytest.fail(
            "Debian's chromium is missing: `apt-get install -y chromium` (scripts/bootstrap does)",
            pytrace=False,
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # --no-sandbox: containers (and root) have no user namespaces for Chromium's sandbox.
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


@dataclass
class Journey:
    """A browser tab on the live service that records what would make the journey fail."""

    page: Page
    base_url: str
    shots: Path | None
    errors: list[str] = field(default_factory=list)
    outside: list[str] = field(default_factory=list)
    failed: list[str] = field(
        default_factory=list
    )  # answers of 400 and above, to say which call errors meant

    def screenshot(self, name: str) -> None:
        if self.shots is not None:
            width = self.page.viewport_size["width"]
            self.page.screenshot(path=self.shots / f"{name}-{width}.png", full_page=True)

    def look(self, name: str) -> None:
        """Screenshot the page (with --screenshots) and check it against WCAG 2.1 AA with axe-core:
        labels, contrast, roles, names."""
        self.screenshot(name)
        results = AXE.run(self.page, options=WCAG_AA)
        assert results.violations_count == 0, f"{name}: {results.generate_report()}"

    def open(self, hash_path: str) -> None:
        self.page.goto(f"{self.base_url}/console/#/{hash_path}")


@pytest.fixture
def journey(live: LiveTunery, browser, request: pytest.FixtureRequest) -> Journey:
    shots = request.config.getoption("--screenshots")
    if shots:
        Path(shots).mkdir(parents=True, exist_ok=True)
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    context.set_default_timeout(60_000)
    expect.set_options(timeout=20_000)  # the machine may be busy training
    page = context.new_page()
    journey = Journey(page=page, base_url=live.base_url, shots=Path(shots) if shots else None)

    def only_this_service(route):
        # Offline: every script, style and font comes from the service; anything else is refused.
        url = route.request.url
        if url.startswith(live.base_url) or url.startswith(("data:", "blob:")):
            route.continue_()
        else:
            journey.outside.append(url)
            route.abort()

    context.route("**/*", only_this_service)
    page.on("console", lambda message: message.type == "error" and journey.errors.append(message.text))
    page.on("pageerror", lambda error: journey.errors.append(f"uncaught: {error}"))
    page.on(
        "response",
        lambda response: (
            response.status >= 400
            and journey.failed.append(f"{response.status} {response.request.method} {response.url}")
        ),
    )
    yield journey
    context.close()


def drop_file(page: Page, selector: str, path: Path) -> None:
    """Drag a file from the desktop onto an element (a real drop event carrying a File)."""
    transfer = page.evaluate_handle(
        """([name, text]) => {
            const transfer = new DataTransfer();
            transfer.items.add(new File([text], name, { type: "application/jsonl" }));
            return transfer;
        }""",
        [path.name, path.read_text()],
    )
    page.dispatch_event(selector, "drop", {"dataTransfer": transfer})


def grouped_validation_file(folder: Path) -> Path:
    """A small validation file whose rows carry a `group` (two registers of the same questions)."""
    path = folder / "grouped_validation.jsonl"
    rows = [json.loads(line) for line in GOOD_FILE.read_text().splitlines()[:16]]
    path.write_text(
        "".join(
            json.dumps({**row, "group": ("casual", "formal")[i % 2]}) + "\n" for i, row in enumerate(rows)
        )
    )
    return path


def choose_option(page: Page, label: str, text: str) -> None:
    """Pick the option of a select whose text contains `text`."""
    select = page.get_by_label(label)
    expect(select.locator("option", has_text=text)).to_have_count(1)
    select.select_option(select.locator("option", has_text=text).get_attribute("value"))


def tuned_is_worse(group: dict, main: str) -> bool:
    return (
        group["fine_tuned"]["loss"] > group["base"]["loss"] or group["fine_tuned"][main] < group["base"][main]
    )


@pytest.mark.slow
def test_a_user_uploads_data_trains_a_model_and_watches_it_learn_in_the_console(
    journey: Journey, live: LiveTunery, tmp_path: Path
):
    page = journey.page

    # Signing in: the root leads to the sign-in form; a wrong key is refused with a clear message.
    page.goto(journey.base_url)
    expect(page.get_by_role("heading", name="Sign in", exact=True)).to_be_visible()
    journey.look("sign-in")
    page.get_by_label("API key").fill("tun_nobody_wrong-key")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_contain_text("This API key was not accepted (401")
    journey.look("sign-in-refused")
    # Chromium logs the refused request itself as an error; that one was the point of this step.
    assert all("401" in error for error in journey.errors), journey.errors
    journey.errors.clear()
    journey.failed.clear()

    page.get_by_label("API key").fill(ADMIN_KEY)
    page.keyboard.press("Enter")  # the form works from the keyboard
    expect(page.get_by_role("heading", name="Jobs", exact=True)).to_be_visible()
    assert page.evaluate("sessionStorage.getItem('tunery.apiKey')") == ADMIN_KEY
    assert ADMIN_KEY not in page.url
    expect(page.get_by_text("No jobs yet")).to_be_visible()
    journey.look("jobs-empty")

    # A broken file: the rejected line is named in a table, with its field and the reason.
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Files").click()
    expect(page.get_by_role("heading", name="Files", exact=True)).to_be_visible()
    page.get_by_label("Choose a file").set_input_files(BROKEN_FILE)
    problems = page.get_by_role("table", name=f"Problems in {BROKEN_FILE.name}")
    expect(problems.get_by_role("row")).to_have_count(2)  # the header and the one problem
    expect(problems.get_by_role("row").nth(1).get_by_role("cell")).to_have_text(
        ["11", "messages[2].role", re.compile('"assitant" is not one of system, user, assistant, tool')]
    )
    expect(page.get_by_role("alert")).to_contain_text("1 problem found")
    journey.look("upload-rejected")

    # A good file, dropped on the page: its first examples as conversations, and its report.
    drop_file(page, "#dropzone", GOOD_FILE)
    expect(page.get_by_role("heading", name=f"{GOOD_FILE.name} is ready")).to_be_visible()
    first = json.loads(GOOD_FILE.read_text().splitlines()[0])["messages"]
    example = page.get_by_role("article", name="Example 1")
    for message in first:
        expect(example).to_contain_text(message["content"])
    report = page.locator("#report")
    expect(report.locator("#length-chart")).to_contain_text("Length distribution")
    with live.client() as client:
        good = next(f for f in client.get("/v1/files").json()["data"] if f["filename"] == GOOD_FILE.name)
    bins = good["report"]["stats"]["characters"]["histogram"]["counts"]
    expect(report.locator("#length-chart .bar-row")).to_have_count(len(bins))
    expect(report.locator("#duplicates-chart")).to_contain_text("exact duplicates")
    expect(report).to_contain_text("82 examples")  # the suggested training split of 91
    expect(page.locator("#upload-progress")).to_have_js_property("value", 1)
    # Token counts with the chosen model's tokenizer and chat template, counted by an evaluator.
    page.get_by_role("button", name="Count tokens").click()
    expect(page.locator("#tokens-stats")).to_contain_text("Tokens in all")
    journey.look("upload-preview")

    # A new job on that file: the catalog's models, and the estimate with the values it chose.
    page.get_by_role("link", name="Fine-tune on this file").click()
    expect(page.get_by_role("heading", name="New job", exact=True)).to_be_visible()
    expect(page.get_by_label("Model")).to_have_value("tunery/tiny-chat")
    expect(page.get_by_label("Training file")).to_contain_text(GOOD_FILE.name)
    page.get_by_label("Epochs").fill("4")
    page.get_by_label("Batch size").fill("2")
    settings = page.get_by_role("table", name="Settings and why")
    expect(settings.get_by_role("row", name=re.compile("^n epochs"))).to_contain_text("4")
    expect(settings.get_by_role("row", name=re.compile("^batch size"))).to_contain_text("2")
    expect(settings.get_by_role("row", name=re.compile("^max seq length"))).to_contain_text("auto:")
    costs = page.get_by_role("table", name="Duration and cost per GPU class")
    expect(costs.get_by_role("row", name=re.compile("^cpu"))).to_contain_text("$")
    steps = 4 * 41  # 82 training examples, 2 per step, 4 epochs
    expect(page.locator("#estimate-result dt:text-is('Optimizer steps') + dd")).to_have_text(str(steps))
    journey.look("new-job")

    # It trains: the loss chart gains points from the event stream while the job runs.
    page.get_by_role("button", name="Create job").click()
    expect(page.get_by_role("heading", name=re.compile(r"^Job ftjob-"))).to_be_visible()
    job_id = page.url.rsplit("/", 1)[-1]
    live.start("inference", wait=False)  # for the playground, later; it loads models when asked
    chart = page.locator("#loss-chart")
    expect(chart).to_have_attribute("data-points", re.compile(r"^[1-9]\d*$"), timeout=180_000)
    plotted = int(chart.get_attribute("data-points"))
    page.wait_for_function(
        "n => Number(document.querySelector('#loss-chart').dataset.points) > n", arg=plotted, timeout=120_000
    )
    expect(page.locator("#job-stats dt:text-is('Step') + dd")).to_have_text(re.compile(rf"^\d+ of {steps}$"))
    expect(page.locator("#events-log")).to_contain_text(f"/{steps}: training loss=")
    journey.look("job-training")

    # Paused while training, then resumed: it carries on from its checkpoint.
    page.get_by_role("button", name="Pause").click()
    expect(page.locator("#job-status")).to_have_attribute("data-stage", "paused")
    expect(page.get_by_role("button", name="Resume")).to_be_enabled()
    journey.look("job-paused")
    page.get_by_role("button", name="Resume").click()
    expect(page.locator("#job-status")).not_to_have_attribute("data-stage", "paused")

    # It succeeds; the chart then holds every step, and the artifacts download.
    expect(page.locator("#job-status")).to_have_attribute("data-stage", "succeeded", timeout=400_000)
    expect(chart).to_have_attribute("data-points", str(steps))
    expect(page.locator("#job-outcome")).to_contain_text(f"ft:tunery/tiny-chat:org-default::{job_id}")
    expect(page.locator("#events-log")).to_contain_text("Job paused by the user")
    with page.expect_download() as download:
        page.get_by_role("button", name="Download artifacts (.tar)").click()
    with tarfile.open(download.value.path()) as archive:
        names = archive.getnames()
        generations = [
            json.loads(line) for line in archive.extractfile("generations.jsonl").read().splitlines()
        ]
    assert any(name.endswith("adapter_model.safetensors") for name in names), names
    journey.look("job-succeeded")

    # Evaluation: base against tuned on every metric, and each generated reply beside its reference.
    page.get_by_role("tab", name="Evaluation").click()
    metrics = page.get_by_role("table", name="Base and tuned model")
    expect(metrics.get_by_role("row", name=re.compile("^Loss"))).to_be_visible()
    expect(page.locator("#verdict")).to_contain_text("Verdict:")
    expect(page.locator("#groups")).to_contain_text("carry no group field")
    replies = page.get_by_role("article", name=re.compile(r"^Generated reply"))
    expect(replies).to_have_count(min(12, len(generations)))
    first_reply = page.get_by_role("article", name="Generated reply 1")
    for text in (generations[0]["reference"], generations[0]["base"], generations[0]["fine_tuned"]):
        expect(first_reply).to_contain_text(text.strip()[:60])
    assert page.url.endswith("?tab=evaluation")
    journey.look("job-evaluation")

    # The playground: one prompt to the base model, the tuned model and a checkpoint (the one the pause saved,
    # when the pause came while it trained; else the oldest listed) at once, the answers side by side.
    with live.client() as client:
        listed = client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints").json()["data"]
    paused_at = next((c for c in listed if c.get("resumable")), listed[-1])["step_number"]
    page.get_by_role("tab", name="Playground").click()
    page.get_by_label("Prompt").fill("Who are you?")
    page.get_by_role("checkbox", name=re.compile(rf"^Checkpoint at step {paused_at}:")).check()
    page.get_by_role("button", name="Ask").click()
    tuned_model = f"ft:tunery/tiny-chat:org-default::{job_id}"
    with live.client() as client:
        expected = client.post(
            "/v1/chat/completions",
            json={
                "model": tuned_model,
                "messages": [{"role": "user", "content": "Who are you?"}],
                "max_tokens": 64,
                "temperature": 0,
            },
            timeout=120,
        ).json()["choices"][0]["message"]["content"]
    expect(page.locator(".answer-grid > article")).to_have_count(3)
    for name in ("Base model's answer", "Tuned model's answer", f"Step {paused_at} checkpoint's answer"):
        expect(page.get_by_role("article", name=name)).not_to_have_attribute(
            "aria-busy", "true", timeout=120_000
        )
        expect(page.get_by_role("article", name=name).locator(".answer-text")).to_be_visible()
    expect(page.get_by_role("article", name="Tuned model's answer").locator(".answer-text")).to_have_text(
        expected.strip()
    )
    journey.look("job-playground")

    # Export: the model card rendered (from its Markdown, sanitized), the adapter alone cut out of the
    # archive, one file on its own; no merged model and no Hub repository were asked for.
    page.get_by_role("tab", name="Export").click()
    expect(page.locator("#model-card-rendered h1")).to_contain_text(
        f"ft:tunery/tiny-chat:org-default::{job_id}"
    )
    expect(page.locator("#model-card-rendered table").first).to_be_visible()  # the card's metrics table
    expect(page.locator("#merged-note")).to_contain_text("export_merged")
    expect(page.locator("#hub-status")).to_contain_text("Not published")
    with page.expect_download() as download:
        page.get_by_role("button", name="Download README.md").click()
    assert Path(download.value.path()).read_text().startswith("---\nbase_model: tunery/tiny-chat")
    with page.expect_download() as download:
        page.get_by_role("button", name="Download adapter (.tar)").click()
    with tarfile.open(download.value.path()) as archive:
        adapter_names = archive.getnames()
    assert adapter_names and all(name.startswith("adapter/") for name in adapter_names), adapter_names
    assert "adapter/adapter_model.safetensors" in adapter_names
    journey.look("job-export")

    # A second, short job with a cost budget, on a validation file whose rows carry groups.
    journey.open("files")
    page.get_by_label("Choose a file").set_input_files(grouped_validation_file(tmp_path))
    expect(page.get_by_role("heading", name="grouped_validation.jsonl is ready")).to_be_visible()
    journey.open("new")
    choose_option(page, "Training file", GOOD_FILE.name)
    choose_option(page, "Validation file", "grouped_validation.jsonl")
    page.get_by_label("Epochs").fill("1")
    page.get_by_label("Batch size").fill("16")
    page.get_by_label("Learning-rate multiplier").fill("2")
    page.get_by_text("Advanced: budget, learning-rate sweep, export").click()
    page.get_by_label("Max cost (USD)").fill("5")
    page.get_by_role("radio", name=re.compile("^Redact")).check()
    second_settings = page.get_by_role("table", name="Settings and why")
    expect(second_settings.get_by_role("row", name=re.compile("^batch size"))).to_contain_text("16")
    expect(second_settings.get_by_role("row", name=re.compile("^learning rate multiplier"))).to_contain_text(
        "2"
    )
    second_steps = page.locator("#estimate-result dt:text-is('Optimizer steps') + dd").inner_text()
    journey.look("new-job-advanced")
    page.get_by_role("button", name="Create job").click()
    expect(page.get_by_role("heading", name=re.compile(r"^Job ftjob-"))).not_to_have_text(f"Job {job_id}")
    second_id = page.url.rsplit("/", 1)[-1]
    expect(page.locator("#job-stats dt:text-is('Budget') + dd")).to_have_text("at most $5.00")
    expect(page.locator("#job-status")).to_have_attribute("data-stage", "succeeded", timeout=300_000)
    expect(page.locator("#job-stats dt:text-is('Cost so far') + dd")).to_contain_text("of $5.00")

    # Its evaluation per group: the groups where the tuned model does worse than the base are marked.
    with live.client() as client:
        evaluation = client.get(f"/v1/fine_tuning/jobs/{second_id}").json()["evaluation"]
    main = evaluation["generation"]["main_metric"]
    groups = evaluation["by_group"]["groups"]
    worse = sorted(name for name, group in groups.items() if tuned_is_worse(group, main))
    page.get_by_role("tab", name="Evaluation").click()
    table = page.get_by_role("table", name="By group")
    expect(table.get_by_role("row")).to_have_count(1 + len(groups))
    expect(table.locator("tr.worse")).to_have_count(len(worse))
    if worse:
        expect(page.locator("#groups")).to_contain_text(
            f"worse than the base for group{'s' if len(worse) > 1 else ''} {', '.join(worse)}"
        )
    journey.look("job-groups")

    # Compare: both jobs ticked on the list, their curves on one chart and what differs in their settings.
    journey.open("jobs")
    expect(page.get_by_role("button", name="Compare selected")).to_be_disabled()
    for job in (job_id, second_id):
        page.get_by_role("checkbox", name=f"Compare {job}").check()
    page.get_by_role("button", name="Compare 2 jobs").click()
    expect(page.get_by_role("heading", name="Compare jobs")).to_be_visible()
    expect(page.locator("#compare-chart")).to_have_attribute("data-series", "2")
    settings = page.get_by_role("table", name="Settings of the compared jobs")
    for differing in (
        "Epochs",
        "Batch size",
        "Learning-rate multiplier",
        "Validation file",
        "Budget",
        "Data policy",
    ):
        expect(settings.locator(f"tr[data-setting='{differing}']")).to_have_class("differs")
    for same in ("Model", "Method", "Training file"):
        expect(settings.locator(f"tr[data-setting='{same}']")).not_to_have_class("differs")
    figures = page.get_by_role("table", name="Evaluation figures of the compared jobs")
    expect(figures.get_by_role("row", name=re.compile("^Steps"))).to_contain_text(f"{steps}")
    expect(figures.get_by_role("row", name=re.compile("^Steps"))).to_contain_text(second_steps)
    journey.look("compare")
    compare_path = page.url.split("#/", 1)[1]

    # The list shows it finished, on a wide screen and on a phone, with nothing wider than the screen.
    journey.open("jobs")
    row = page.get_by_role("row", name=re.compile(job_id))
    expect(row).to_contain_text("succeeded")
    expect(row).to_contain_text(f"{steps}/{steps}")
    journey.look("jobs")
    # The catalog: each model's size, context, licence and whether a job on it fits each GPU class.
    journey.open("models")
    tiny = page.locator("#models-table tr[data-model='tunery/tiny-chat']")
    expect(tiny).to_contain_text("512 tokens")
    expect(tiny).to_contain_text("apache-2.0")
    expect(tiny.locator("li.fits-yes")).to_contain_text("cpu: fits")
    expect(page.locator("#tuned-models-table")).to_contain_text(job_id)
    journey.look("models")

    # A standalone evaluation: the catalog model alone on the grouped validation file.
    journey.open("evaluations")
    choose_option(page, "Validation file", "grouped_validation.jsonl")
    page.get_by_label("Replies to generate").fill("2")
    page.get_by_role("button", name="Evaluate").click()
    expect(page.get_by_role("heading", name=re.compile(r"^Evaluation eval"))).to_be_visible()
    expect(page.locator("#evaluation-status")).to_have_attribute("data-status", "succeeded", timeout=180_000)
    expect(
        page.get_by_role("table", name="The model's figures").get_by_role("row", name=re.compile("^Loss"))
    ).to_be_visible()
    evaluation_path = page.url.split("#/", 1)[1]
    journey.look("evaluation")

    # Keys: an admin makes a member key (its secret shown once), then revokes it; the API refuses it after.
    journey.open("keys")
    page.get_by_label("Name").fill("journey-member")
    page.get_by_role("button", name="Create key").click()
    secret = page.locator("#new-key")
    expect(secret).to_have_value(re.compile(r"^tun_"))
    member_key = secret.input_value()
    member_id = member_key.split("_")[1]
    row = page.locator(f"#keys-table tr[data-key='{member_id}']")
    expect(row).to_contain_text("member")
    journey.look("keys")
    row.get_by_role("button", name=f"Revoke {member_id}").click()
    page.get_by_role("button", name=f"Yes, revoke {member_id}").click()
    expect(row).to_contain_text("revoked")
    with httpx.Client(base_url=journey.base_url) as client:
        refused = client.get("/v1/files", headers={"Authorization": f"Bearer {member_key}"})
    assert refused.status_code == 401
    page.set_viewport_size({"width": 390, "height": 844})
    for shot, name, shown in [
        ("jobs", "jobs", "#jobs-table"),
        ("job", f"jobs/{job_id}", f"#loss-chart[data-points='{steps}']"),
        ("files", "files", "#files-table"),
        ("new", "new", "#estimate-result"),
        ("models", "models", "#models-table li.fits-yes"),
        ("file", f"files/{good['id']}", "#length-chart"),
        ("evaluation", evaluation_path, "#evaluation-metrics"),
        ("keys", "keys", "#keys-table"),
        ("compare", compare_path, "#compare-chart[data-series='2']"),
        ("job-groups", f"jobs/{second_id}?tab=evaluation", "#group-metrics"),
        ("job-playground", f"jobs/{job_id}?tab=playground", "#playground"),
        ("job-export", f"jobs/{job_id}?tab=export", "#model-card-rendered h1"),
    ]:
        journey.open(name)
        expect(page.locator(shown).first).to_be_visible()
        journey.look(shot)
        overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, f"#/{name} is {overflow}px wider than a 390px screen"

    # The API docs, also from the service itself.
    page.set_viewport_size({"width": 1280, "height": 900})
    page.goto(f"{journey.base_url}/docs")
    expect(page.locator(".info .title")).to_contain_text("Tunery")
    expect(page.locator(".opblock-tag", has_text="fine-tuning")).to_be_visible()
    journey.screenshot("docs")

    assert journey.outside == [], "the console fetched from outside the service"
    assert journey.errors == [], journey.failed


def test_a_file_over_16_mb_goes_up_through_the_uploads_api_in_parts(browser, served: str, tmp_path: Path):
    """Large files are not sent in one request: the console creates an upload, sends 16 MB parts and
    completes it, and the file is checked like any other."""
    big = tmp_path / "big.jsonl"
    row = json.loads(GOOD_FILE.read_text().splitlines()[0])
    with big.open("w") as out:
        i = 0
        while out.tell() <= 17_000_000:  # two parts
            out.write(json.dumps({**row, "id": i}) + "\n")
            i += 1
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    sent = []
    page.on("request", lambda request: sent.append(f"{request.method} {request.url.removeprefix(served)}"))

    page.goto(f"{served}/console/")
    page.get_by_label("API key").fill(ADMIN_KEY)
    page.keyboard.press("Enter")
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Files").click()
    page.get_by_label("Choose a file").set_input_files(big)
    expect(page.get_by_role("heading", name="big.jsonl is ready")).to_be_visible(timeout=180_000)

    uploads = [request for request in sent if request.startswith("POST /v1/uploads")]
    assert uploads[0] == "POST /v1/uploads"
    assert [request.rsplit("/", 1)[-1] for request in uploads[1:]] == ["parts", "parts", "complete"]
    assert "POST /v1/files" not in sent
    with client(served) as http:
        stored = next(f for f in http.get("/v1/files").json()["data"] if f["filename"] == "big.jsonl")
    assert (stored["bytes"], stored["status"]) == (big.stat().st_size, "processed")
    context.close()
