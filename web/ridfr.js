// RIDFR's frontend extension.
// - RIDFR Sample: with settings 'backend defaults' the steps/guidance/sampler/scheduler widgets are unused, so they
//   are greyed out (disabled, labelled "backend default") until settings is 'custom'.
// - Model downloads: when the nodes of this pack in a loaded workflow need registered model files that ComfyUI
//   cannot see, a dialog lists them with their sizes and licences and offers to download them (server routes in
//   nodes/downloads.py, the same downloader and plan as `python -m ridfr_core.models download`), with progress.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const BACKEND_WIDGETS = ["steps", "guidance", "sampler_name", "scheduler"];
const DIALOG_ID = "ridfr-downloads";

function followSettings(node) {
  const settings = node.widgets?.find((w) => w.name === "settings");
  if (!settings || node.ridfrFollowSettings) return;
  const apply = () => {
    const defaults = settings.value === "backend defaults";
    for (const widget of node.widgets.filter((w) => BACKEND_WIDGETS.includes(w.name))) {
      widget.disabled = defaults;
      widget.label = defaults ? `${widget.name}: backend default` : undefined;
    }
    node.setDirtyCanvas?.(true, true);
  };
  const callback = settings.callback;
  settings.callback = function () {
    const result = callback?.apply(this, arguments);
    apply();
    return result;
  };
  node.ridfrFollowSettings = apply;
  apply();
}

const HEADERS = { "Content-Type": "application/json", "X-RIDFR-Request": "1" };  // refused without it (nodes/downloads.py)

function megabytes(bytes) {
  return bytes == null ? "?" : `${(bytes / 1e6).toFixed(1)} MB`;
}

function element(tag, props = {}, children = []) {
  const node = Object.assign(document.createElement(tag), props);
  for (const child of children) node.append(child);
  return node;
}

function closeDialog() {
  document.getElementById(DIALOG_ID)?.remove();
}

async function pollProgress(status, button) {
  for (;;) {
    const job = await (await api.fetchApi("/ridfr/models/download")).json();
    const count = job.files.length;
    if (job.running) {
      const part = job.total ? ` (${Math.floor((100 * job.done) / job.total)}%)` : "";
      status.textContent = `Downloading ${job.current ?? "…"}: ${megabytes(job.done)} of ${megabytes(job.total)}` +
        `${part}; file ${Math.min(job.finished.length + 1, count)} of ${count}.`;
    } else {
      const done = job.results.length ? `Done: ${job.results.join("; ")}.` : "";
      status.textContent = job.errors.length
        ? `${done} Failed: ${job.errors.join("; ")} Press Download again to resume.`.trim() : done;
      status.dataset.done = "true";
      button.disabled = !job.errors.length;
      await app.refreshComboInNodes();
      return;
    }
    await new Promise((resolve) => setTimeout(resolve, 300));
  }
}

function licenceOf(file) {
  return file.licence
    ? element("span", {}, [" — licence: ", element("a", { href: file.licence.url, target: "_blank",
      textContent: file.licence.name }), `: ${file.licence.terms}`])
    : "";
}

// files: what this pack's nodes lack; ifLacking: what a file still to download (RestorerIDFull.ckpt) usually holds,
// fetched after it only for a part it lacks (the same plan as `python -m ridfr_core.models download`).
function showDialog(files, ifLacking) {
  closeDialog();
  const downloadable = files.filter((file) => file.downloadable);
  const rows = files.map((file) => {
    const how = file.downloadable ? ` (${file.size_text}, ${file.source})` : `: ${file.how_to_get}`;
    return element("li", { className: "ridfr-file" }, [`models/${file.relative} — ${file.what}${how}`, licenceOf(file)]);
  });
  const held = ifLacking.map((file) => element("li", { className: "ridfr-if-lacking" }, [
    `models/${file.relative} (${file.size_text}): only if ${file.holder_name} lacks ${file.holds}`, licenceOf(file)]));
  const accept = element("input", { type: "checkbox", id: "ridfr-accept-licences" });
  const status = element("div", { className: "ridfr-status" });
  const button = element("button", { textContent: "Download missing RIDFR models", className: "ridfr-download",
    disabled: true });
  accept.onchange = () => { button.disabled = !accept.checked || !downloadable.length; };
  button.onclick = async () => {
    button.disabled = true;
    delete status.dataset.done;
    const wanted = [...downloadable, ...ifLacking].map((file) => file.relative);
    const answer = await api.fetchApi("/ridfr/models/download", {
      method: "POST", headers: HEADERS, body: JSON.stringify({ files: wanted, accept_licences: accept.checked }),
    });
    if (!answer.ok) {
      status.textContent = (await answer.json()).error;
      button.disabled = false;
      return;
    }
    await pollProgress(status, button);
  };
  const heldNote = held.length
    ? [element("p", { textContent: "Downloaded first, the files above are checked for what they hold; these are " +
      "fetched after them only where that is missing:" }), element("ul", {}, held)]
    : [];
  const dialog = element("div", { id: DIALOG_ID, style: "position:fixed;top:15%;left:50%;transform:translateX(-50%);" +
    "z-index:10000;max-width:720px;background:var(--comfy-menu-bg,#222);color:var(--fg-color,#ddd);" +
    "border:1px solid #666;border-radius:8px;padding:16px;font-size:14px" }, [
    element("h3", { textContent: "This workflow needs RIDFR model files that are not in ComfyUI's models folder" }),
    element("ul", {}, rows),
    ...heldNote,
    element("label", {}, [accept, " I accept the licences of these files"]),
    element("div", { style: "margin:8px 0" }, [button, " ",
      element("button", { textContent: "Close", onclick: closeDialog })]),
    status,
  ]);
  document.body.append(dialog);
}

function graphNodes() {
  // Every node's type and widget values by name; the server reads only this pack's nodes (nodes/model_needs.py).
  return (app.graph?.nodes ?? []).map((node) => ({
    type: node.comfyClass ?? node.type,
    widgets: Object.fromEntries((node.widgets ?? []).filter((w) => w.name && ["string", "number", "boolean"]
      .includes(typeof w.value)).map((w) => [w.name, w.value])),
  }));
}

async function offerDownloads() {
  const nodes = graphNodes();
  if (!nodes.length) return;
  const answer = await api.fetchApi("/ridfr/models/missing", {
    method: "POST", headers: HEADERS, body: JSON.stringify({ nodes }),
  });
  if (!answer.ok) return;
  const { files, if_lacking: ifLacking } = await answer.json();
  if (files.length) showDialog(files, ifLacking);
}

app.registerExtension({
  name: "RIDFR.ui",
  nodeCreated(node) {
    if (node.comfyClass === "RIDFRSample") followSettings(node);
  },
  loadedGraphNode(node) {  // a saved workflow's values are set after nodeCreated, without the callback
    if (node.comfyClass !== "RIDFRSample") return;
    followSettings(node);
    node.ridfrFollowSettings?.();
  },
  async afterConfigureGraph() {
    await offerDownloads();
  },
});
