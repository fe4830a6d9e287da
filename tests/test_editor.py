"""Issue 9: the shipped workflows in ComfyUI's own editor, in headless Chromium, against the real server.

The server (tests/comfy_server.py) serves the editor from the frontend package that ComfyUI v0.3.64's
requirements name (comfyui-frontend-package==1.27.10). Its folders hold what the shipped workflows name:
the tiny random checkpoint under the workflows' checkpoint name, random concept files
my_concept_00001 / my_other_concept_00001 shaped for it, and the photo folders, so every widget value of the
shipped files is a valid choice, as it is for a user who has those files. Debian's Chromium, driven by
Playwright (nothing is downloaded at run time), opens the editor with a fresh profile; every request to
anything but the loopback server is refused.

For each file in workflows/ the test drops it on the editor as a user would (a file drop), then checks in
the editor's graph that no node type is missing (no placeholder nodes, no "missing nodes" dialog) and that
no widget value is out of its options or range, and that the prompt the editor would queue
(app.graphToPrompt) is the one support/workflow_api.py builds. A deliberately broken copy (an unknown node
type, a concept file that does not exist, a step count below its minimum) proves those checks catch each
fault. It hovers every input of every Perfusion node and reads the tooltip the editor shows, which must be
the node's own tooltip from /object_info (and the node's description over its title). It takes a
screenshot of each workflow for the README (docs/screenshots/<workflow>.png) and one of each Perfusion node
for its help page (web/docs/<NodeId>.png), both on the current host, whose editor users run today. It opens
each node's help page from the node library and checks its text and picture, searches the nodes by their
aliases and checks which inputs are folded away as advanced (v0.33.0; v0.3.64 has neither, and the pack
must then send neither). Finally it sets the generate workflow to 2 steps at 64x64 in the editor, presses
Run and waits until the image appears on the Save Image node.

The training workflow with SAM3 masks needs SAM3_Detect, which v0.3.64 does not have: there the editor must
report exactly that node as missing, and nothing else.

Needs Chromium (apt-get install chromium; .ci/run installs it) and Playwright (requirements-dev.txt). Without
them the test is skipped with that reason, except under .ci/run (PERFUSION_REQUIRE_BROWSER=1), where it fails.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import pytest

from comfy_server import LOOPBACK, REPO, ComfyServer, tiny_checkpoint_file
from conftest import HOST_NAME
from support.shipped_workflows import SAM3_NODES
from support.tiny_checkpoint import write_placeholder_photos
from support.workflow_api import ui_to_api

pytestmark = [pytest.mark.host, pytest.mark.server]
log = logging.getLogger(__name__)

WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))
SCREENSHOTS = REPO / "docs" / "screenshots"
HELP_PAGES = REPO / "web" / "docs"
# Screenshots and help pictures come from the current host's editor (frontend 1.49), the one users run today.
TAKES_PICTURES = HOST_NAME == "current"
GENERATE = "perfusion_generate"
CHROMIUM = os.environ.get("PERFUSION_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-default-apps", "--disable-extensions", "--host-resolver-rules=MAP * ~NOTFOUND, "
                 "EXCLUDE 127.0.0.1"]
VIEWPORT = {"width": 1920, "height": 1080}  # the train workflow is ~2500 units wide: fitted at ~67 %
SERVER_ARGS = ["--fp32-text-enc"]
# A returning user: no template browser on first start; tooltips after 50 ms instead of 500; no minimap or
# canvas statistics (FPS) in the screenshots, and text drawn at any zoom (the screenshots are fitted to the
# graph; below 60 % the editor would otherwise draw nodes without their text). The three navigation settings
# are the defaults, stored: with them unset, frontend 1.27.10 throws an uncaught TypeError at start-up (its
# NavigationMode setting sets the other two before they are registered), which would hide errors of our own.
SETTINGS = {"Comfy.TutorialCompleted": True, "LiteGraph.Node.TooltipDelay": 50, "Comfy.Minimap.Visible": False,
            "Comfy.Graph.CanvasInfo": False, "LiteGraph.Canvas.MinFontSizeForLOD": 0,
            "Comfy.Canvas.NavigationMode": "legacy",
            "Comfy.Canvas.LeftMouseClickBehavior": "panning", "Comfy.Canvas.MouseWheelScroll": "zoom"}
TIMEOUT_MS = 60_000
PERFUSION_NODES = {"PerfusionLoadPhotos", "PerfusionTrainConcept", "PerfusionSaveConcept", "PerfusionLoadConcept",
                   "PerfusionApplyConcept", "PerfusionCombineConcepts", "PerfusionGateSweep"}
# What the nodes' schemas mark advanced (nodes/train.py, nodes/apply.py): folded away on hosts that support it.
ADVANCED = {"PerfusionTrainConcept": {"value_lr", "embedding_lr", "train_beta", "train_tau", "covariance",
                                      "train_values", "train_keys"},
            "PerfusionApplyConcept": {"start_at", "end_at", "multi_concept_mode"}}
ALIASES = ["personalize", "concept", "textual inversion", "dreambooth"]


def _playwright():
    reason = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright, reason = None, "Playwright is not installed (pip install -r requirements-dev.txt)"
    if reason is None and not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        reason = f"no Chromium at {CHROMIUM} (apt-get install chromium, as .ci/run does)"
    if reason:
        if os.environ.get("PERFUSION_REQUIRE_BROWSER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return sync_playwright


# ---------------------------------------------------------------- the server, with what the workflows name

def _shipped_values() -> dict[str, set[str]]:
    """Checkpoint names, concept files and photo folders the shipped workflows refer to."""
    wanted = {"CheckpointLoaderSimple": set(), "PerfusionLoadConcept": set(), "PerfusionLoadPhotos": set()}
    for path in WORKFLOWS:
        for node in json.loads(path.read_text())["nodes"]:
            if node["type"] in wanted:
                wanted[node["type"]].add(node["widgets_values"][0])
    return wanted


def _write_concepts(folder: Path, checkpoint: Path, files: set[str]) -> None:
    """Random concepts shaped for the tiny checkpoint's UNet (its cross-attention layers and widths)."""
    import comfy.sd
    from perfusion_ops.concept_file import write_concept
    from reference import random_concept
    model = comfy.sd.load_checkpoint_guess_config(str(checkpoint), output_vae=False, output_clip=False)[0]
    folder.mkdir(parents=True, exist_ok=True)
    for seed, filename in enumerate(sorted(files)):
        name = filename.removesuffix(".safetensors").rsplit("_", 1)[0]
        write_concept(random_concept(model, "sd1", name, seed=seed), folder / filename)


@pytest.fixture(scope="module")
def sync_playwright():
    return _playwright()


@pytest.fixture(scope="module")
def server(tmp_path_factory, host, sync_playwright):  # Playwright first: skip before starting anything
    checkpoint = tiny_checkpoint_file(tmp_path_factory)
    srv = ComfyServer(host, tmp_path_factory.mktemp("editor_server"), None, extra_args=SERVER_ARGS)
    srv.layout()
    wanted = _shipped_values()
    for name in wanted["CheckpointLoaderSimple"]:  # the tiny model under the name the workflows use
        os.link(checkpoint, srv.models / "checkpoints" / name)
    _write_concepts(srv.models / "perfusion", checkpoint, wanted["PerfusionLoadConcept"])
    for folder in wanted["PerfusionLoadPhotos"]:
        write_placeholder_photos(srv.input_dir / folder)
    (srv.base / "user" / "default").mkdir(parents=True, exist_ok=True)
    (srv.base / "user" / "default" / "comfy.settings.json").write_text(json.dumps(SETTINGS))
    with srv:
        yield srv


@pytest.fixture(scope="module")
def object_info(server):
    return server.object_info()


# ---------------------------------------------------------------- the browser

class Editor:
    """The editor in one page, with its errors and refused requests collected."""

    def __init__(self, page, server: ComfyServer):
        self.page, self.server = page, server
        self.page_errors: list[str] = []
        self.refused: list[str] = []

    def open(self) -> None:
        started = time.monotonic()
        self.page.goto(self.server.url, wait_until="domcontentloaded")
        self.page.wait_for_function("() => window.app && window.app.vueAppReady && window.app.graph "
                                    "&& window.LiteGraph && Object.keys(window.LiteGraph.registered_node_types).length")
        self._wait_until_the_graph_settles()  # the editor restores the workflows open before a reload
        log.info("editor ready in %.1f s", time.monotonic() - started)
        self.clear_leaving_masks()

    def _wait_until_the_graph_settles(self, quiet_s: float = 1.0, limit_s: float = 15.0) -> None:
        """Until the graph's node types have not changed for `quiet_s` (at most `limit_s`)."""
        last, quiet_since, deadline = None, time.monotonic(), time.monotonic() + limit_s
        while time.monotonic() < deadline:
            types = self.page.evaluate("() => window.app.graph.nodes.map(n => n.type).join(',')")
            if types != last:
                last, quiet_since = types, time.monotonic()
            elif time.monotonic() - quiet_since >= quiet_s:
                return
            self.page.wait_for_timeout(250)

    def clear_leaving_masks(self) -> None:
        """Remove overlay masks stuck in their leave animation. Frontend 1.49 (v0.33.0) blocks the canvas with a
        PrimeVue BlockUI while it loads; in headless Chromium the mask's animationend does not arrive, so the
        invisible mask stays and swallows every click and hover. A mask that is still entering is left alone."""
        self.page.evaluate("""() => document.querySelectorAll('.p-blockui-mask.p-overlay-mask-leave')
            .forEach(mask => mask.remove())""")

    def drop(self, path: Path, text: str | None = None) -> None:
        """Drop a workflow file on the canvas, as a user drags one from the file manager. After a reload the
        editor may still be restoring its last workflows when the drop arrives, and replace the dropped graph
        a moment later: then the file is dropped again (at most three times)."""
        content = text if text is not None else path.read_text()
        expected = sorted(node["type"] for node in json.loads(content)["nodes"])
        for _ in range(3):
            self._drop_once(path.name, content, expected)
            if sorted(node["type"] for node in self.graph()) == expected:
                return
            log.info("the dropped %s was replaced after loading; dropping it again", path.name)
        raise AssertionError(f"the editor does not keep the dropped {path.name}")

    def _drop_once(self, name: str, content: str, expected: list[str]) -> None:
        self.page.evaluate("() => window.app.graph.nodes.forEach(n => { n.__replaced = true; })")
        self.page.evaluate("""([name, text]) => {
            const file = new File([text], name, {type: 'application/json'});
            const transfer = new DataTransfer();
            transfer.items.add(file);
            const canvas = document.querySelector('#graph-canvas');
            for (const type of ['dragenter', 'dragover', 'drop'])
                canvas.dispatchEvent(new DragEvent(type, {dataTransfer: transfer, bubbles: true, cancelable: true}));
        }""", [name, content])
        # The dropped graph, node type for node type (not a restored one of the same size).
        self.page.wait_for_function("""(expected) => !window.app.graph.nodes.some(n => n.__replaced)
            && JSON.stringify(window.app.graph.nodes.map(n => n.type).sort()) === JSON.stringify(expected)""",
                                    arg=expected)
        self.page.wait_for_timeout(500)  # dialogs, the first draw, and a late restore if one is coming
        self.clear_leaving_masks()

    def dialogs(self) -> list[str]:
        """Visible dialogs (frontend 1.27, v0.3.64: missing nodes open one) and error notices (frontend 1.49,
        v0.33.0: 'N errors found' with a 'View details' button)."""
        return self.page.evaluate("""() => [...document.querySelectorAll('.p-dialog, [role=status]')]
            .filter(d => d.offsetParent !== null && (d.classList.contains('p-dialog') || /error/i.test(d.innerText)))
            .map(d => d.innerText.trim().slice(0, 500))""")

    def error_details(self) -> str:
        """What the editor says about the problems of the loaded graph: the dialogs' text, plus the details
        behind an error notice's 'View details' (frontend 1.49)."""
        text = "\n".join(self.dialogs())
        opened = self.page.evaluate("""() => { const button = document.querySelector(
            '[data-testid=error-overlay-see-errors]'); if (button) button.click(); return !!button; }""")
        if opened:
            self.page.wait_for_timeout(500)
            text += "\n" + self.page.evaluate("() => document.body.innerText")
        return text

    def close_dialogs(self) -> None:
        for _ in range(3):
            if not self.dialogs():
                return
            self.page.keyboard.press("Escape")
            self.page.evaluate("""() => document.querySelectorAll('[role=status] button[aria-label]').forEach(b => {
                if (/close|dismiss/i.test(b.getAttribute('aria-label'))) b.click(); })""")
            self.page.wait_for_timeout(200)

    def graph(self) -> list[dict]:
        """Every node of the editor's graph: type, whether the editor knows it, widgets with their limits."""
        return self.page.evaluate("""() => window.app.graph.nodes.map(n => ({
            id: n.id, type: n.type, mode: n.mode, has_errors: !!n.has_errors,
            registered: n.type in window.LiteGraph.registered_node_types,
            widgets: (n.widgets || []).map(w => ({name: w.name, type: w.type, value: w.value,
                values: Array.isArray(w.options && w.options.values) ? w.options.values : null,
                min: w.options ? w.options.min : undefined, max: w.options ? w.options.max : undefined})),
        }))""")

    def problems(self) -> list[str]:
        """What a user would see as wrong after loading: missing node types, values not among a widget's
        choices or outside its range, dialogs (the editor's 'missing nodes' warning among them)."""
        found = []
        for node in self.graph():
            where = f"node {node['id']} ({node['type']})"
            if not node["registered"] or node["has_errors"]:
                found.append(f"{where}: node type missing in the editor")
            for widget in node["widgets"]:
                value = widget["value"]
                if widget["values"] is not None and value not in widget["values"]:
                    found.append(f"{where}: {widget['name']} = {value!r} is not one of its choices")
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    if widget["min"] is not None and value < widget["min"] or \
                            widget["max"] is not None and value > widget["max"]:
                        found.append(f"{where}: {widget['name']} = {value!r} outside "
                                     f"[{widget['min']}, {widget['max']}]")
        found += [f"dialog: {text}" for text in self.dialogs()]
        return found

    def overlaps(self) -> list[str]:
        """Pairs of nodes that cover each other in the editor (title bars included)."""
        return self.page.evaluate("""() => {
            const nodes = window.app.graph.nodes, found = [];
            const box = n => n.getBounding(new Float32Array(4));
            for (let i = 0; i < nodes.length; i++) for (let j = i + 1; j < nodes.length; j++) {
                const a = box(nodes[i]), b = box(nodes[j]);
                if (a[0] < b[0] + b[2] && b[0] < a[0] + a[2] && a[1] < b[1] + b[3] && b[1] < a[1] + a[3])
                    found.push(`${nodes[i].type} ${nodes[i].id} and ${nodes[j].type} ${nodes[j].id}`);
            }
            return found; }""")

    def fit_view(self) -> None:
        """The whole graph, as large as the window allows (the editor's own fit leaves a quarter empty)."""
        self.page.evaluate("""() => { const nodes = window.app.graph.nodes, canvas = window.app.canvas;
            let [x0, y0, x1, y1] = [Infinity, Infinity, -Infinity, -Infinity];
            for (const n of nodes) { const b = n.getBounding(new Float32Array(4));
                x0 = Math.min(x0, b[0]); y0 = Math.min(y0, b[1]);
                x1 = Math.max(x1, b[0] + b[2]); y1 = Math.max(y1, b[1] + b[3]); }
            canvas.ds.fitToBounds([x0, y0, x1 - x0, y1 - y0], {zoom: 0.9}); canvas.setDirty(true, true); }""")
        self.page.wait_for_timeout(400)

    def editor_prompt(self) -> dict:
        return self.page.evaluate("async () => (await window.app.graphToPrompt()).output")

    # -- tooltips ----------------------------------------------------------------------------------------
    def show_node(self, node_id) -> None:
        """Scale 1, the node near the top left of the canvas, drawn (widget positions are set while drawing).
        (The classic canvas of frontend 1.49 draws advanced widgets too; only Nodes 2.0 folds them.)"""
        self.page.evaluate("""(id) => { const node = window.app.graph.getNodeById(id);
            const ds = window.app.canvas.ds; ds.scale = 1; ds.offset = [80 - node.pos[0], 120 - node.pos[1]];
            window.app.canvas.setDirty(true, true); window.app.canvas.draw(true, true); }""", node_id)
        self.page.wait_for_timeout(100)

    def node_picture(self, node_id, path: Path) -> None:
        """A screenshot of the node as show_node placed it, title bar and sockets included."""
        box = self.page.evaluate("""(id) => { const app = window.app, node = app.graph.getNodeById(id);
            const rect = app.canvas.canvas.getBoundingClientRect(), title = window.LiteGraph.NODE_TITLE_HEIGHT;
            const corner = app.canvas.ds.convertOffsetToCanvas([node.pos[0], node.pos[1] - title]);
            return {x: rect.left + corner[0] - 12, y: rect.top + corner[1] - 8,
                    width: node.size[0] + 24, height: node.size[1] + title + 16}; }""", node_id)
        self.page.mouse.move(VIEWPORT["width"] - 5, VIEWPORT["height"] - 5)  # no hover highlight
        self.page.wait_for_timeout(100)
        self.page.screenshot(path=str(path), clip=box)

    # -- the node library, search ------------------------------------------------------------------------
    def open_help(self, display_name: str) -> dict:
        """Open a node's help page as a user does: the node library (sidebar), search the node's name, hover it,
        press its help button. Frontend 1.49's new library design has no help button, so its classic design
        (a setting) is used there. Returns the help panel's text and its pictures (src, natural width)."""
        self.page.evaluate("""async () => { const settings = window.app.extensionManager.setting;
            if (settings.get('Comfy.NodeLibrary.NewDesign')) await settings.set('Comfy.NodeLibrary.NewDesign', false); }""")
        search = self.page.locator("input[placeholder^='Search Nodes']:visible")
        for _ in range(3):  # the tab button opens the library, or closes it when it was open in the other design
            if search.count():
                break
            # The help page of the last node stands in the library's place: its back arrow returns to the library.
            went_back = self.page.evaluate("""() => { let area = document.querySelector('.node-help-content');
                for (let i = 0; area && area.offsetParent && i < 5; i++, area = area.parentElement) {
                    const back = [...area.querySelectorAll('button')].find(b => b.getAttribute('aria-label') === 'Back'
                                                                           || b.querySelector('[class*=arrow-left]'));
                    if (back) { back.click(); return true; } }
                return false; }""")
            if not went_back:
                self.page.click(".node-library-tab-button")
            self.page.wait_for_timeout(300)
        search.first.fill(display_name)
        leaf = self.page.locator(".node-lib-node-container", has_text=display_name).first
        leaf.hover()
        leaf.locator(".help-button").click()
        self.page.wait_for_function("""(name) => [...document.querySelectorAll('.node-help-content')].some(
            panel => panel.innerText.includes(name) && [...panel.querySelectorAll('img')].every(i => i.complete))""",
                                    arg=display_name)
        return self.page.evaluate("""(name) => { const panel = [...document.querySelectorAll('.node-help-content')]
            .find(p => p.innerText.includes(name));
            return {text: panel.innerText, pictures: [...panel.querySelectorAll('img')].map(i => [i.src, i.naturalWidth])}; }""",
                                  display_name)

    def search(self, text: str) -> list[str]:
        """The node names the editor's node search (double-click on the canvas) offers for `text`."""
        self.page.keyboard.press("Escape")
        self.page.evaluate("() => window.app.extensionManager.command.execute('Workspace.SearchBox.Toggle')")
        box = self.page.get_by_placeholder("Add a node...")
        box.fill(text)
        self.page.wait_for_timeout(600)  # the search runs as the user types
        names = self.page.evaluate("""() => [...document.querySelectorAll('[role=option]')]
            .map(option => option.innerText.split('\\n')[0].trim())""")
        self.page.keyboard.press("Escape")
        return names

    def targets(self, node_id) -> dict:
        """Client coordinates of the node's title, of each widget (by name) and of each input socket."""
        return self.page.evaluate("""(id) => {
            const app = window.app, node = app.graph.getNodeById(id);
            const rect = app.canvas.canvas.getBoundingClientRect();
            const client = (x, y) => { const c = app.canvas.ds.convertOffsetToCanvas([x, y]);
                                       return [rect.left + c[0], rect.top + c[1]]; };
            const widgets = {};
            for (const w of node.widgets || []) {
                if (w.last_y === undefined) continue;
                const h = w.computedHeight || window.LiteGraph.NODE_WIDGET_HEIGHT;
                widgets[w.name] = client(node.pos[0] + node.size[0] * 0.5, node.pos[1] + w.last_y + h / 2);
            }
            const sockets = {};
            node.inputs.forEach((input, slot) => {
                if (input.widget) return;  // a widget's socket: its tooltip is checked on the widget
                const p = node.getConnectionPos(true, slot); sockets[input.name] = client(p[0], p[1]);
            });
            const title = client(node.pos[0] + node.size[0] * 0.5,
                                 node.pos[1] - window.LiteGraph.NODE_TITLE_HEIGHT / 2);
            return {title, widgets, sockets};
        }""", node_id)

    def empty_point(self) -> list[float]:
        """Client coordinates of a point of the canvas with no node under it."""
        return self.page.evaluate("""() => { const app = window.app, rect = app.canvas.canvas.getBoundingClientRect();
            for (let y = rect.top + 40; y < rect.bottom - 40; y += 20)
              for (let x = rect.left + 40; x < rect.right - 40; x += 20) {
                const p = app.canvas.ds.convertCanvasToOffset([x - rect.left, y - rect.top]);
                if (!app.graph.getNodeOnPos(p[0], p[1])) return [x, y]; }
            return null; }""")

    def tooltip_at(self, point) -> str:
        self.page.mouse.move(point[0] + 40, point[1] + 40)  # move off and back: each stop shows a tooltip
        self.page.mouse.move(point[0], point[1], steps=2)
        try:
            self.page.wait_for_selector(".node-tooltip", state="visible", timeout=3000)
        except Exception:  # Playwright's TimeoutError: no tooltip there
            return ""
        return self.page.inner_text(".node-tooltip").strip()


def _same_text(a: str, b: str) -> bool:
    return " ".join(a.split()) == " ".join(b.split())


@pytest.fixture(scope="module")
def editor(server, sync_playwright, tmp_path_factory):
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium_profile")), executable_path=CHROMIUM, headless=True,
            args=CHROMIUM_ARGS, viewport=VIEWPORT, device_scale_factor=1, timeout=TIMEOUT_MS)
        try:
            context.set_default_timeout(TIMEOUT_MS)
            page = context.pages[0] if context.pages else context.new_page()
            editor = Editor(page, server)
            allowed = (f"http://{LOOPBACK}:{server.port}/", f"ws://{LOOPBACK}:{server.port}/", "data:", "blob:")

            def route(route_, request):
                if request.url.startswith(allowed):
                    route_.continue_()
                else:
                    editor.refused.append(request.url)
                    route_.abort()
            context.route("**/*", route)
            page.on("pageerror", lambda error: editor.page_errors.append(str(error)))
            editor.open()
            yield editor
        finally:
            context.close()
    if editor.refused:
        log.info("requests refused (not loopback): %s", sorted(set(editor.refused)))


# ---------------------------------------------------------------- the tests

def test_every_shipped_workflow_loads_with_known_nodes_and_accepted_values(editor, object_info):
    assert WORKFLOWS, "no workflows in workflows/"
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    failures = []
    for path in WORKFLOWS:
        workflow = json.loads(path.read_text())
        editor.drop(path)
        # A host without SAM3 (v0.3.64) must report SAM3's node as missing, and warn; nothing else may be wrong.
        missing = {n["type"] for n in workflow["nodes"]} & (set(SAM3_NODES) - set(object_info))
        problems = editor.problems()
        for node_type in missing:
            expected = [p for p in problems if p.endswith(f"({node_type}): node type missing in the editor")]
            if not expected or not any(p.startswith("dialog:") for p in problems):
                failures.append(f"{path.name}: {node_type} is not reported missing: {problems}")
            problems = [p for p in problems if p not in expected and not p.startswith("dialog:")]
        failures += [f"{path.name}: {problem}" for problem in problems]
        failures += [f"{path.name}: nodes cover each other in the editor: {pair}" for pair in editor.overlaps()]
        if {node["type"] for node in editor.graph()} != {node["type"] for node in workflow["nodes"]}:
            failures.append(f"{path.name}: the editor's graph has other node types than the file")

        strip = lambda prompt: {k: {"class_type": v["class_type"], "inputs": v["inputs"]}  # noqa: E731
                                for k, v in prompt.items()}
        # (With a missing node the editor refuses to queue at all: nothing to compare.)
        if not missing and strip(editor.editor_prompt()) != strip(ui_to_api(workflow, object_info)):
            failures.append(f"{path.name}: the prompt the editor queues differs from support/workflow_api.py's: "
                            f"{strip(editor.editor_prompt())} != {strip(ui_to_api(workflow, object_info))}")

        editor.close_dialogs()
        if TAKES_PICTURES:
            editor.fit_view()
            editor.page.mouse.move(VIEWPORT["width"] - 5, VIEWPORT["height"] - 5)  # no hover highlight
            editor.page.screenshot(path=str(SCREENSHOTS / f"{path.stem}.png"))
    assert failures == []
    assert editor.page_errors == [], "uncaught errors in the editor"


def test_the_checks_catch_a_missing_node_a_missing_file_and_a_value_out_of_range(editor):
    workflow = json.loads((REPO / "workflows" / f"{GENERATE}.json").read_text())
    for node in workflow["nodes"]:
        if node["type"] == "PerfusionApplyConcept":
            node["type"] = "PerfusionNoSuchNode"
        elif node["type"] == "PerfusionLoadConcept":
            node["widgets_values"][0] = "no_such_concept.safetensors"
        elif node["type"] == "KSampler":
            node["widgets_values"][2] = 0  # steps, minimum 1
    editor.drop(REPO / "workflows" / "broken.json", json.dumps(workflow))
    problems = editor.problems()
    details = editor.error_details()
    editor.open()  # a fresh page: the details panel of frontend 1.49 blocks the canvas until it is closed
    editor.close_dialogs()  # the restored broken workflow warns again on reload
    report = "\n".join(problems)
    assert "(PerfusionNoSuchNode): node type missing" in report, report
    assert "concept_name = 'no_such_concept.safetensors' is not one of its choices" in report, report
    assert "steps = 0 outside [1," in report, report
    assert any(p.startswith("dialog:") for p in problems), report  # the user is warned...
    assert "PerfusionNoSuchNode" in details, details  # ...naming the missing node


def test_every_input_of_every_perfusion_node_shows_its_tooltip(editor, object_info):
    seen, wrong = set(), []
    for path in WORKFLOWS:
        editor.drop(path)
        editor.close_dialogs()  # v0.3.64 warns about SAM3's node, missing there
        for node in editor.graph():
            if node["type"] not in PERFUSION_NODES or node["type"] in seen:
                continue
            seen.add(node["type"])
            info = object_info[node["type"]]
            editor.show_node(node["id"])
            if TAKES_PICTURES:
                editor.node_picture(node["id"], HELP_PAGES / f"{node['type']}.png")
            targets = editor.targets(node["id"])
            assert editor.tooltip_at(editor.empty_point()) == "", "a tooltip over the empty canvas: checks are blind"
            shown = editor.tooltip_at(targets["title"])
            if not _same_text(shown, info["description"]):
                wrong.append(f"{node['type']} title: {shown!r}")
            for section in ("required", "optional"):
                for name, spec in info["input"].get(section, {}).items():
                    tooltip = spec[1].get("tooltip") if len(spec) > 1 else None
                    if not tooltip:
                        wrong.append(f"{node['type']}.{name}: no tooltip in /object_info")
                        continue
                    point = targets["widgets"].get(name) or targets["sockets"].get(name)
                    if point is None:
                        wrong.append(f"{node['type']}.{name}: not shown on the node")
                        continue
                    shown = editor.tooltip_at(point)
                    if not _same_text(shown, tooltip):
                        wrong.append(f"{node['type']}.{name}: shows {shown!r}")
    assert seen == PERFUSION_NODES, f"the shipped workflows do not use {PERFUSION_NODES - seen}"
    assert wrong == []


def test_every_nodes_help_page_opens_from_the_node_library_with_its_text_and_picture(editor, object_info):
    """web/docs/<NodeId>.md, served by ComfyUI under the pack's WEB_DIRECTORY, is what the editor's help panel
    shows for each node: its first paragraph, and the node's picture, loaded."""
    assert {path.stem for path in HELP_PAGES.glob("*.md")} == PERFUSION_NODES
    editor.drop(REPO / "workflows" / f"{GENERATE}.json")
    editor.close_dialogs()
    wrong = []
    for node_type in sorted(PERFUSION_NODES):
        page = (HELP_PAGES / f"{node_type}.md").read_text()
        first_paragraph = " ".join(page.split("\n\n")[1].replace("`", "").replace("*", "").split())
        shown = editor.open_help(object_info[node_type]["display_name"])
        if first_paragraph not in " ".join(shown["text"].split()):
            wrong.append(f"{node_type}: the help panel does not show the page's first paragraph: {shown['text'][:300]!r}")
        pictures = [(src, width) for src, width in shown["pictures"] if src.endswith(f"/docs/{node_type}.png")]
        if len(pictures) != 1 or pictures[0][1] == 0:
            wrong.append(f"{node_type}: the picture did not load: {shown['pictures']}")
    assert wrong == []
    assert editor.page_errors == [], "uncaught errors in the editor"


def test_search_aliases_and_advanced_inputs_where_the_host_supports_them(editor, object_info):
    """v0.33.0: the node search finds the pack's nodes by each alias (words in none of their names), and the
    inputs marked advanced are exactly the folded ones. v0.3.64 has neither: the pack sends neither there."""
    specs = {node: {name: spec[1] if len(spec) > 1 else {} for section in ("required", "optional")
                    for name, spec in object_info[node]["input"].get(section, {}).items()} for node in ADVANCED}
    if HOST_NAME == "minimum":
        assert not any("search_aliases" in object_info[node] for node in PERFUSION_NODES)
        assert not any("advanced" in spec for node in specs for spec in specs[node].values())
        return
    for alias in ALIASES:
        found = editor.search(alias)
        names = {object_info[node]["display_name"] for node in ("PerfusionTrainConcept", "PerfusionApplyConcept")}
        assert names <= set(found), f"searching '{alias}' offers {found}"
    for node, expected in ADVANCED.items():
        assert {name for name, spec in specs[node].items() if spec.get("advanced")} == expected
    # The editor marks exactly those widgets advanced; its modern node design (Nodes 2.0) folds them away
    # behind "Show advanced inputs" (its classic canvas, the default, draws every widget).
    editor.drop(REPO / "workflows" / "perfusion_train_concept.json")
    marked = editor.page.evaluate("""() => Object.fromEntries(window.app.graph.nodes.map(n => [n.type,
        (n.widgets || []).filter(w => w.options && w.options.advanced).map(w => w.name)]))""")
    for node, expected in ADVANCED.items():
        assert set(marked[node]) == expected, f"{node} marks {marked[node]}"
    editor.page.evaluate("() => window.app.extensionManager.setting.set('Comfy.VueNodes.Enabled', true)")
    try:
        editor.drop(REPO / "workflows" / "perfusion_train_concept.json")
        shown = editor.page.evaluate("""(types) => Object.fromEntries(types.map(type => {
            const node = window.app.graph.nodes.find(n => n.type === type);
            const element = document.querySelector(`[data-node-id="${node.id}"]`);
            return [type, element ? element.innerText.split('\\n').map(line => line.trim()) : null]; }))""",
                                     list(ADVANCED))
    finally:
        editor.page.evaluate("() => window.app.extensionManager.setting.set('Comfy.VueNodes.Enabled', false)")
    for node, expected in ADVANCED.items():
        assert shown[node] is not None, f"{node} not drawn by Nodes 2.0"
        assert "Show advanced inputs" in shown[node] and not expected & set(shown[node]), shown[node]
        assert "strength" in shown[node] or "steps" in shown[node], shown[node]  # the others are drawn


def test_generate_workflow_queued_from_the_editor_shows_its_image(editor, server):
    editor.drop(REPO / "workflows" / f"{GENERATE}.json")
    save_id = editor.page.evaluate("""() => {
        const set = (type, name, value) => { for (const n of window.app.graph.nodes.filter(n => n.type === type)) {
            const w = n.widgets.find(w => w.name === name); w.value = value; w.callback && w.callback(value); } };
        set('KSampler', 'steps', 2); set('EmptyLatentImage', 'width', 64); set('EmptyLatentImage', 'height', 64);
        return window.app.graph.nodes.find(n => n.type === 'SaveImage').id; }""")
    started = time.monotonic()
    with editor.page.expect_response(lambda r: r.url.endswith("/api/prompt") and r.request.method == "POST") as posted:
        editor.page.click('[data-testid="queue-button"]')
    answer = posted.value.json()
    assert posted.value.ok and not answer.get("node_errors"), answer
    entry = server.wait([answer["prompt_id"]], timeout=240)[answer["prompt_id"]]
    assert entry["status"]["status_str"] == "success", entry["status"]
    editor.page.wait_for_function("""(id) => { const n = window.app.graph.getNodeById(id);
        return n.imgs && n.imgs.length && n.imgs[0].complete && n.imgs[0].naturalWidth === 64; }""",
                                  arg=save_id, timeout=30_000)
    shown = editor.page.evaluate("(id) => window.app.graph.getNodeById(id).imgs[0].src", save_id)
    saved = entry["outputs"][str(save_id)]["images"][0]["filename"]
    assert "/view?" in shown and saved in shown, shown
    log.info("queued from the editor: image shown %.1f s after Run", time.monotonic() - started)
    assert editor.page_errors == [], "uncaught errors in the editor"
