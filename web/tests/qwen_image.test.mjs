// Tests of the frontend extension with node's built-in runner: `node --test web/tests/`.
// Files here end in .mjs on purpose: ComfyUI loads every *.js under WEB_DIRECTORY into the page.
import assert from "node:assert/strict";
import { describe, it } from "node:test";

import {
  EVENT,
  PREFLIGHT_MIN_WIDTH,
  badgeMinWidth,
  createExtension,
  drawBadge,
  fitPanel,
  escapeHtml,
  formatBytes,
  formatDownload,
  formatDuration,
  governorBadge,
  preflightHtml,
  preflightRows,
} from "../qwen_image_logic.js";

// --- small stand-ins for ComfyUI's page objects -------------------------------------------------------
class FakeElement {
  constructor(tag) {
    this.tag = tag;
    this.style = {};
    this.textContent = "";
    this.innerHTML = "";
    this.className = "";
  }
}
const fakeDocument = { createElement: (tag) => new FakeElement(tag) };

class FakeNode {
  constructor(id) {
    this.id = id;
    this.size = [300, 120];
    this.widgets = [];
    this.dirty = 0;
  }
  addDOMWidget(name, type, element) {
    const widget = { name, type, element };
    this.widgets.push(widget);
    return widget;
  }
  setDirtyCanvas() {
    this.dirty += 1;
  }
}

function fakeApp(nodes) {
  return { graph: { getNodeById: (id) => nodes.find((n) => n.id === id) ?? null } };
}

class FakeCtx {
  constructor() {
    this.calls = [];
    this.font = "";
    this.fillStyle = "";
  }
  save() { this.calls.push("save"); }
  restore() { this.calls.push("restore"); }
  measureText(text) { return { width: text.length * 7 }; }
  beginPath() {}
  roundRect(...args) { this.calls.push(["roundRect", ...args]); }
  fill() { this.calls.push("fill"); }
  fillText(text, x, y) { this.calls.push(["fillText", text, x, y]); }
}

async function registerNode(extension, name, node) {
  const nodeType = function () {};
  nodeType.prototype = Object.create(FakeNode.prototype);
  await extension.beforeRegisterNodeDef(nodeType, { name });
  Object.setPrototypeOf(node, nodeType.prototype);
  return node;
}

// --- formatting -------------------------------------------------------------------------------------
describe("formatting", () => {
  it("formats bytes with decimal units", () => {
    assert.equal(formatBytes(0), "0 B");
    assert.equal(formatBytes(1500), "1.5 KB");
    assert.equal(formatBytes(40.9e9), "40.9 GB");
    assert.equal(formatBytes(-1), "?");
    assert.equal(formatBytes(Number.NaN), "?");
  });

  it("formats durations", () => {
    assert.equal(formatDuration(42), "42s");
    assert.equal(formatDuration(460), "7m 40s");
    assert.equal(formatDuration(7300), "2h 01m");
    assert.equal(formatDuration(undefined), "?");
  });

  it("shows bytes, percentage, speed and ETA while downloading", () => {
    const line = formatDownload({ state: "downloading", done_bytes: 1.2e9, total_bytes: 40e9, speed_bps: 85e6, eta_s: 460 });
    assert.equal(line, "1.2 GB / 40.0 GB (3%) · 85.0 MB/s · ETA 7m 40s");
  });

  it("says partials are kept when cancelled, and the size when complete", () => {
    assert.match(formatDownload({ state: "cancelled", done_bytes: 5e6 }), /partials kept/);
    assert.equal(formatDownload({ state: "complete", total_bytes: 17e6 }), "Complete: 17.0 MB");
  });

  it("escapes HTML so report text cannot inject markup", () => {
    assert.equal(escapeHtml(`<img src=x onerror="a">&'`), "&lt;img src=x onerror=&quot;a&quot;&gt;&amp;&#39;");
  });
});

describe("preflight table", () => {
  const report = {
    status: "warn",
    profile: { dtype: "bf16", memory_mode: "model_offload", max_pixels: 1048576 },
    checks: [
      { name: "GPU", status: "ok", measured: "24 GB", needed: "16 GB", message: "fine" },
      { name: "Disk <x>", status: "fail", measured: "10 GB", needed: "60 GB", message: "low", recommendation: "free space" },
      { name: "odd", status: "strange" },
    ],
  };

  it("turns every check into a row and keeps unknown statuses visible as warn", () => {
    const rows = preflightRows(report);
    assert.equal(rows.length, 3);
    assert.deepEqual(rows.map((r) => r.status), ["ok", "fail", "warn"]);
    assert.equal(rows[1].message, "low free space");
  });

  it("renders verdict, profile and escaped cells", () => {
    const html = preflightHtml(report);
    assert.match(html, /Verdict: WARN/);
    assert.match(html, /memory_mode: model_offload/);
    assert.match(html, /Disk &lt;x&gt;/);
    assert.equal((html.match(/<tr>/g) ?? []).length, 4); // header + 3 checks
    assert.equal((html.match(/<th /g) ?? []).length, 5);
  });

  it("renders an empty report without throwing", () => {
    assert.match(preflightHtml({}), /Verdict: WARN/);
  });

  it("lets long cells wrap so the Notes column is never pushed out of view", () => {
    // Regression: a long path in "Measured" widened the table past the node and cut the Notes column.
    const html = preflightHtml({ checks: [{ name: "disk", measured: "/a/very/long/path/".repeat(20) }] });
    assert.match(html, /overflow-wrap:anywhere/);
  });
});

describe("panel sizing", () => {
  it("grows the node to the panel's content and to a minimum width", () => {
    const node = new FakeNode(1);
    node.size = [400, 200];
    node.setSize = (size) => { node.size = size; };
    node.computeSize = () => [380, 40 + (element.__qwenHeight ?? 0)];
    const element = { style: { maxHeight: "2000px" }, scrollHeight: 520 };
    assert.deepEqual(fitPanel(node, element, PREFLIGHT_MIN_WIDTH), [PREFLIGHT_MIN_WIDTH, 566]);
    assert.equal(element.__qwenHeight, 526, "all 14 rows: the panel claims its whole content height");
  });

  it("caps a panel at its max height", () => {
    const node = new FakeNode(2);
    node.setSize = (size) => { node.size = size; };
    const element = { style: { maxHeight: "160px" }, scrollHeight: 900 };
    fitPanel(node, element);
    assert.equal(element.__qwenHeight, 160);
  });
});

describe("safe mode badge", () => {
  it("appears only when the governor reduced the size", () => {
    assert.equal(governorBadge({ scaled: false }), null);
    assert.equal(governorBadge(undefined), null);
    const badge = governorBadge({ scaled: true, message: "Safe Mode: Reduced pixel window" });
    assert.equal(badge.text, "SAFE MODE");
    assert.match(badge.tooltip, /Reduced/);
  });

  it("draws inside the title bar at the right edge", () => {
    const ctx = new FakeCtx();
    assert.equal(drawBadge(ctx, { size: [300, 100] }, governorBadge({ scaled: true })), true);
    const text = ctx.calls.find((c) => Array.isArray(c) && c[0] === "fillText");
    assert.equal(text[1], "SAFE MODE");
    assert.ok(text[2] > 150 && text[2] < 300, "badge sits at the right of the title");
    assert.ok(text[3] < 0, "badge is drawn in the title bar (negative y)");
    assert.equal(drawBadge(new FakeCtx(), { size: [300, 100] }, null), false);
  });

  it("widens a node at its default width instead of covering the title", () => {
    // Regression: at the default width (~277 px) the badge was drawn over "Qwen-Image Pixel Governor".
    const node = { title: "Qwen-Image Pixel Governor", size: [277, 210] };
    node.setSize = (size) => { node.size = size; };
    const ctx = new FakeCtx();
    const badge = governorBadge({ scaled: true });
    const needed = badgeMinWidth(ctx, node, badge, 30);
    assert.ok(needed > 277);
    drawBadge(ctx, node, badge, 30);
    assert.equal(node.size[0], needed);
    const text = ctx.calls.find((c) => Array.isArray(c) && c[0] === "fillText");
    const titleEnd = 30 + node.title.length * 7;
    assert.ok(text[2] - 6 >= titleEnd, "the badge starts right of the title's end");
  });
});

// --- the extension wired to stand-ins for ComfyUI's app/api ---------------------------------------------
describe("extension", () => {
  it("shows the preflight report table on the Preflight node when it executes", async () => {
    const ext = createExtension(fakeApp([]), new EventTarget(), fakeDocument);
    const node = await registerNode(ext, "QwenImagePreflight", new FakeNode(1));
    node.onExecuted({ text: ["..."], qwen_report: [{ status: "ok", checks: [{ name: "RAM", status: "ok" }] }] });
    assert.equal(node.widgets.length, 1);
    assert.match(node.widgets[0].element.innerHTML, /Verdict: OK/);
    node.onExecuted({ qwen_report: [{ status: "fail", checks: [] }] });
    assert.equal(node.widgets.length, 1, "the panel is reused, not duplicated");
    assert.match(node.widgets[0].element.innerHTML, /Verdict: FAIL/);
  });

  it("keeps a node's own onExecuted working (chains, does not replace)", async () => {
    const ext = createExtension(fakeApp([]), new EventTarget(), fakeDocument);
    const nodeType = function () {};
    nodeType.prototype = Object.create(FakeNode.prototype);
    let called = 0;
    nodeType.prototype.onExecuted = () => { called += 1; };
    await ext.beforeRegisterNodeDef(nodeType, { name: "QwenImagePreflight" });
    const node = Object.setPrototypeOf(new FakeNode(2), nodeType.prototype);
    node.onExecuted({ qwen_report: [{ status: "ok" }] });
    assert.equal(called, 1);
  });

  it("updates the Downloader live from websocket status events, matched by node id", async () => {
    const downloader = new FakeNode(7);
    const other = new FakeNode(8);
    const api = new EventTarget();
    const ext = createExtension(fakeApp([downloader, other]), api, fakeDocument);
    await ext.setup();
    api.dispatchEvent(new CustomEvent(EVENT, {
      detail: { kind: "download", node: "7", state: "downloading", done_bytes: 5e8, total_bytes: 1e9, speed_bps: 1e8, eta_s: 5 },
    }));
    assert.equal(downloader.widgets[0].element.textContent, "500 MB / 1.0 GB (50%) · 100 MB/s · ETA 5s");
    assert.equal(other.widgets.length, 0);
    assert.ok(downloader.dirty > 0, "canvas redrawn");
    // Unknown nodes and other kinds are ignored without throwing.
    api.dispatchEvent(new CustomEvent(EVENT, { detail: { kind: "download", node: "99" } }));
    api.dispatchEvent(new CustomEvent(EVENT, { detail: { kind: "other", node: "7" } }));
    assert.equal(downloader.widgets.length, 1);
  });

  it("shows the Downloader's final report, including the endpoint, when it executes", async () => {
    const ext = createExtension(fakeApp([]), new EventTarget(), fakeDocument);
    const node = await registerNode(ext, "QwenImageDownloader", new FakeNode(4));
    node.onExecuted({ text: ["org/m@abc -> /models/org/m\nEndpoint: https://hf-mirror.example (from the workflow)"],
                      qwen_download: [{ state: "complete", total_bytes: 2e9 }] });
    const text = node.widgets[0].element.textContent;
    assert.match(text, /^Complete: 2.0 GB\n/);
    assert.match(text, /Endpoint: https:\/\/hf-mirror.example/);
  });

  it("finds nodes inside subgraphs by the last id segment", async () => {
    const node = new FakeNode(12);
    const api = new EventTarget();
    const ext = createExtension(fakeApp([node]), api, fakeDocument);
    await ext.setup();
    api.dispatchEvent(new CustomEvent(EVENT, { detail: { kind: "download", node: "5:12", state: "complete", total_bytes: 1e6 } }));
    assert.equal(node.widgets[0].element.textContent, "Complete: 1.0 MB");
  });

  it("puts the Safe Mode badge on the PixelGovernor only when it scaled", async () => {
    const ext = createExtension(fakeApp([]), new EventTarget(), fakeDocument);
    const node = await registerNode(ext, "QwenImagePixelGovernor", new FakeNode(3));
    node.onExecuted({ text: ["Safe Mode: Reduced pixel window (1664x928 -> 1184x656)"], qwen_governor: [{ scaled: true, message: "m" }] });
    let ctx = new FakeCtx();
    node.onDrawForeground(ctx);
    assert.ok(ctx.calls.some((c) => Array.isArray(c) && c[1] === "SAFE MODE"));
    assert.match(node.widgets[0].element.textContent, /Safe Mode/);
    node.onExecuted({ text: ["1328x1328 fits"], qwen_governor: [{ scaled: false }] });
    ctx = new FakeCtx();
    node.onDrawForeground(ctx);
    assert.equal(ctx.calls.length, 0);
  });

  it("leaves other node types untouched", async () => {
    const ext = createExtension(fakeApp([]), new EventTarget(), fakeDocument);
    const nodeType = function () {};
    await ext.beforeRegisterNodeDef(nodeType, { name: "KSampler" });
    assert.equal(nodeType.prototype.onExecuted, undefined);
    assert.equal(nodeType.prototype.onDrawForeground, undefined);
  });
});
