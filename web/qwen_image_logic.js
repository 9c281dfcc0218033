// Logic of the Qwen-Image frontend extension, kept free of ComfyUI imports so `node --test` can run it
// against small stand-ins for ComfyUI's `app` and `api`. qwen_image.js wires it into the real page.
//
// What it shows:
//  - Preflight: the report as a readable table on the node (status colour per check, verdict, profile); the
//    node grows to show every row, and long cells wrap instead of pushing the Notes column out of view.
//  - Downloader: live bytes / speed / ETA from the "qwen-image.status" websocket event.
//  - PixelGovernor: a visible "SAFE MODE" badge in the title bar when the size was reduced; the node widens
//    rather than letting the badge cover its title.

export const EVENT = "qwen-image.status";
export const NODES = {
  preflight: "QwenImagePreflight",
  downloader: "QwenImageDownloader",
  governor: "QwenImagePixelGovernor",
};
const STATUS_COLOURS = { ok: "#3c9a4a", warn: "#c99a1d", fail: "#c0392b" };
const CELL = "padding:2px 4px;border-bottom:1px solid #444;vertical-align:top;text-align:left";
// Check and Status stay on one line; a long path or version string in the other columns wraps inside its
// cell (overflow-wrap:anywhere), so the table never grows wider than the node and Notes stays visible.
const KEY = `${CELL};white-space:nowrap`;
const WRAP = `${CELL};overflow-wrap:anywhere`;
const TABLE = "width:100%;border-collapse:collapse;font-size:10px;table-layout:auto";
export const PREFLIGHT_MIN_WIDTH = 460; // px: five columns, Notes readable
const PANEL_MAX_HEIGHT = { preflight: 2000, download: 260, governor: 160 };

export function escapeHtml(value) {
  return String(value ?? "")
    .replaceAll("&", "&amp;")
    .replaceAll("<", "&lt;")
    .replaceAll(">", "&gt;")
    .replaceAll('"', "&quot;")
    .replaceAll("'", "&#39;");
}

export function formatBytes(n) {
  const value = Number(n);
  if (!Number.isFinite(value) || value < 0) return "?";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let v = value;
  let i = 0;
  while (v >= 1000 && i < units.length - 1) {
    v /= 1000;
    i += 1;
  }
  return `${i === 0 ? v.toFixed(0) : v.toFixed(v >= 100 ? 0 : 1)} ${units[i]}`;
}

export function formatDuration(seconds) {
  const s = Number(seconds);
  if (!Number.isFinite(s) || s < 0) return "?";
  if (s < 60) return `${Math.round(s)}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${String(Math.round(s % 60)).padStart(2, "0")}s`;
  return `${Math.floor(s / 3600)}h ${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m`;
}

// One line for the Downloader node: "1.2 GB / 40.9 GB (3%) · 85.0 MB/s · ETA 7m 40s".
export function formatDownload(status) {
  const done = Number(status?.done_bytes ?? 0);
  const total = Number(status?.total_bytes ?? 0);
  if (status?.state === "complete") return `Complete: ${formatBytes(total || done)}`;
  if (status?.state === "cancelled") return `Cancelled at ${formatBytes(done)} (partials kept for resume)`;
  if (status?.state === "error") return `Failed: ${status?.message ?? "see the node error"}`;
  const pct = total > 0 ? ` (${Math.floor((100 * done) / total)}%)` : "";
  const parts = [`${formatBytes(done)} / ${total > 0 ? formatBytes(total) : "?"}${pct}`];
  if (Number(status?.speed_bps) > 0) parts.push(`${formatBytes(status.speed_bps)}/s`);
  if (status?.eta_s != null && Number.isFinite(Number(status.eta_s))) {
    parts.push(`ETA ${formatDuration(status.eta_s)}`);
  }
  return parts.join(" · ");
}

// Rows of the preflight table; tolerant of missing fields so an older/newer report still renders.
export function preflightRows(report) {
  const checks = Array.isArray(report?.checks) ? report.checks : [];
  return checks.map((c) => ({
    name: String(c?.name ?? "?"),
    status: ["ok", "warn", "fail"].includes(c?.status) ? c.status : "warn",
    measured: c?.measured ?? "",
    needed: c?.needed ?? "",
    message: [c?.message, c?.recommendation].filter(Boolean).join(" "),
  }));
}

export function preflightHtml(report) {
  const verdict = ["ok", "warn", "fail"].includes(report?.status) ? report.status : "warn";
  const profile = report?.profile ?? {};
  const profileText = ["dtype", "memory_mode", "max_pixels"]
    .filter((k) => profile[k] != null)
    .map((k) => `${k}: ${escapeHtml(profile[k])}`)
    .join(" · ");
  const rows = preflightRows(report)
    .map(
      (r) =>
        `<tr><td style="${KEY}">${escapeHtml(r.name)}</td>` +
        `<td style="${KEY};color:${STATUS_COLOURS[r.status]};font-weight:bold">${r.status.toUpperCase()}</td>` +
        `<td style="${WRAP}">${escapeHtml(r.measured)}</td><td style="${WRAP}">${escapeHtml(r.needed)}</td>` +
        `<td style="${WRAP}">${escapeHtml(r.message)}</td></tr>`,
    )
    .join("");
  return (
    `<div class="qwen-preflight-verdict" style="color:${STATUS_COLOURS[verdict]};font-weight:bold">` +
    `Verdict: ${verdict.toUpperCase()}</div>` +
    (profileText ? `<div class="qwen-preflight-profile">${profileText}</div>` : "") +
    `<table class="qwen-preflight-table" style="${TABLE}"><thead><tr>` +
    ["Check", "Status", "Measured", "Needed", "Notes"].map((h) => `<th style="${KEY}">${h}</th>`).join("") +
    `</tr></thead><tbody>${rows}</tbody></table>`
  );
}

// The Safe Mode badge: shown only when the governor reduced the size.
export function governorBadge(info) {
  if (!info || !info.scaled) return null;
  return { text: "SAFE MODE", tooltip: String(info.message ?? "Size reduced to fit memory"), colour: "#c99a1d" };
}

// Width the node needs so that its title and the badge do not overlap (title text starts after the
// collapse dot, about one title height from the left edge).
export function badgeMinWidth(ctx, node, badge, titleHeight = 30) {
  if (!badge) return 0;
  ctx.save();
  ctx.font = "bold 11px sans-serif";
  const badgeWidth = ctx.measureText(badge.text).width + 12;
  ctx.font = `${globalThis.LiteGraph?.NODE_TEXT_SIZE ?? 14}px sans-serif`;
  const titleWidth = ctx.measureText(String(node.title ?? "")).width;
  ctx.restore();
  return Math.ceil(titleHeight + titleWidth + 12 + badgeWidth + 8);
}

export function drawBadge(ctx, node, badge, titleHeight = 30) {
  if (!badge) return false;
  const needed = badgeMinWidth(ctx, node, badge, titleHeight);
  if (node.size[0] < needed) {
    // Widen once instead of drawing over the title (at the default width the two collided).
    if (typeof node.setSize === "function") node.setSize([needed, node.size[1]]);
    else node.size[0] = needed;
  }
  ctx.save();
  ctx.font = "bold 11px sans-serif";
  const width = ctx.measureText(badge.text).width + 12;
  const x = node.size[0] - width - 8;
  const y = -titleHeight + 7;
  ctx.fillStyle = badge.colour;
  ctx.beginPath();
  if (ctx.roundRect) ctx.roundRect(x, y, width, 16, 4);
  else ctx.rect(x, y, width, 16);
  ctx.fill();
  ctx.fillStyle = "#111";
  ctx.fillText(badge.text, x + 6, y + 12);
  ctx.restore();
  return true;
}

// The first value of a ComfyUI "ui" entry (ComfyUI sends lists).
export function first(value) {
  return Array.isArray(value) ? value[0] : value;
}

function panel(node, name, doc) {
  node.__qwenPanels = node.__qwenPanels ?? {};
  if (node.__qwenPanels[name]) return node.__qwenPanels[name];
  const element = doc.createElement("div");
  element.className = `qwen-image-${name}`;
  element.style.cssText =
    `font:11px sans-serif;color:var(--input-text,#ddd);overflow:auto;max-height:${PANEL_MAX_HEIGHT[name] ?? 260}px;` +
    "white-space:pre-wrap";
  if (typeof node.addDOMWidget === "function") {
    // getMinHeight: the node's layout reserves what the content needs (ComfyUI's DOM widget option).
    node.addDOMWidget(`qwen_${name}`, "qwen_panel", element, {
      serialize: false,
      hideOnZoom: false,
      getMinHeight: () => element.__qwenHeight ?? 24,
    });
  }
  node.__qwenPanels[name] = element;
  return element;
}

// After new content: let the panel claim its height (capped per panel) and grow the node to show it all.
export function fitPanel(node, element, minWidth = 0) {
  const cap = parseInt(element.style?.maxHeight ?? "", 10) || 2000;
  const content = Number(element.scrollHeight) || 0;
  if (content > 0) element.__qwenHeight = Math.min(content + 6, cap);
  const wanted = typeof node.computeSize === "function" ? node.computeSize() : null;
  const width = Math.max(node.size?.[0] ?? 0, minWidth, wanted?.[0] ?? 0);
  const height = Math.max(node.size?.[1] ?? 0, wanted?.[1] ?? 0);
  if (typeof node.setSize === "function") node.setSize([width, height]);
  node.setDirtyCanvas?.(true, true);
  return [width, height];
}

function show(node, name, doc, fill, minWidth = 0) {
  const element = panel(node, name, doc);
  fill(element);
  // The DOM lays the content out on the next frame; measure then (immediately in tests without rAF).
  const later = globalThis.requestAnimationFrame ?? ((fn) => fn());
  later(() => fitPanel(node, element, minWidth));
  return element;
}

function chain(proto, method, fn) {
  const original = proto[method];
  proto[method] = function (...args) {
    const result = original?.apply(this, args);
    fn.apply(this, args);
    return result;
  };
}

export function findNode(app, id) {
  if (id == null) return null;
  const local = String(id).split(":").pop(); // subgraph executions report "parent:child"
  return app?.graph?.getNodeById?.(Number(local)) ?? app?.graph?.getNodeById?.(local) ?? null;
}

// Build the extension object given ComfyUI's `app` and `api` (real ones in the page, stand-ins in tests).
export function createExtension(app, api, doc = globalThis.document) {
  return {
    name: "qwen-image.ui",
    async setup() {
      api.addEventListener(EVENT, (event) => {
        const detail = event.detail ?? {};
        if (detail.kind !== "download") return;
        const node = findNode(app, detail.node);
        if (!node) return;
        panel(node, "download", doc).textContent = formatDownload(detail);
        node.setDirtyCanvas?.(true, false);
      });
    },
    async beforeRegisterNodeDef(nodeType, nodeData) {
      const proto = nodeType.prototype;
      if (nodeData?.name === NODES.preflight) {
        chain(proto, "onExecuted", function (message) {
          const report = first(message?.qwen_report);
          if (report) show(this, "preflight", doc, (el) => { el.innerHTML = preflightHtml(report); }, PREFLIGHT_MIN_WIDTH);
        });
      } else if (nodeData?.name === NODES.downloader) {
        chain(proto, "onExecuted", function (message) {
          // Final state plus the report (files fetched/resumed, and which endpoint was used).
          const status = first(message?.qwen_download);
          const lines = [status ? formatDownload(status) : null, first(message?.text)].filter(Boolean);
          if (lines.length) show(this, "download", doc, (el) => { el.textContent = lines.join("\n"); });
        });
      } else if (nodeData?.name === NODES.governor) {
        chain(proto, "onExecuted", function (message) {
          this.__qwenBadge = governorBadge(first(message?.qwen_governor));
          show(this, "governor", doc, (el) => { el.textContent = String(first(message?.text) ?? ""); });
        });
        chain(proto, "onDrawForeground", function (ctx) {
          drawBadge(ctx, this, this.__qwenBadge, globalThis.LiteGraph?.NODE_TITLE_HEIGHT ?? 30);
        });
      }
    },
  };
}
