(function () {
  "use strict";
  const D = JSON.parse(document.getElementById("gate-data").textContent);
  const T = D.tokens.length;
  // Colour scales: [value, [r, g, b]] stops; z: orange (rewrite) - white - blue (keep),
  // r: magenta (reset) - white - green (use the old state).
  const SCALES = {
    z: [[0, [202, 75, 18]], [0.25, [244, 165, 110]], [0.5, [247, 246, 242]], [0.75, [122, 176, 218]], [1, [29, 88, 160]]],
    r: [[0, [142, 30, 110]], [0.25, [215, 140, 195]], [0.5, [246, 246, 242]], [0.75, [150, 200, 120]], [1, [45, 110, 40]]]
  };
  // A minGRU's z writes the candidate at 1 (h' = (1 - z) h + z h~): its scale is z's reversed,
  // so that blue keeps and orange writes for both cells.
  const WRITES = D.z_writes;
  if (WRITES) SCALES.z = SCALES.z.map(([v, c]) => [1 - v, c]).reverse();
  const HAS_R = D.gates.includes("r");
  const NAMES = { z: "update gate z", r: "reset gate r" };
  const LEGEND = {
    z: "<b>Update gate z.</b> h&prime; = z&odot;h + (1&minus;z)&odot;h&#771;. " +
       "<b style='color:rgb(29,88,160)'>z &asymp; 1: keeps</b> the old state (nothing new to write down); " +
       "<b style='color:rgb(202,75,18)'>z &asymp; 0: rewrites</b> it with the candidate h&#771; (something worth remembering).",
    r: "<b>Reset gate r.</b> The candidate h&#771; = tanh(x W + r&odot;(h W) + b). " +
       "<b style='color:rgb(45,110,40)'>r &asymp; 1: uses</b> the old state to form the candidate; " +
       "<b style='color:rgb(142,30,110)'>r &asymp; 0: resets</b>, the candidate ignores the past (a fresh start)."
  };
  if (WRITES) LEGEND.z = "<b>Update gate z of a minGRU: the opposite of the GRU's z.</b> " +
    "h&prime; = (1&minus;z)&odot;h + z&odot;h&#771;, with z and h&#771; read from the input only. " +
    "<b style='color:rgb(202,75,18)'>z &asymp; 1: writes</b> the candidate h&#771; (something worth remembering); " +
    "<b style='color:rgb(29,88,160)'>z &asymp; 0: keeps</b> the old state.";
  // The saturation plot's axes: x = fraction of steps z < 0.1, y = fraction z > 0.9.
  const KEEP = WRITES ? "left" : "right", WRITE = WRITES ? "right" : "left";
  const S = { gate: "z", unit: -1, layer: D.layers.length - 1, stretch: true };

  const $ = (id) => document.getElementById(id);
  const esc = (s) => String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
  const visible = (s) => ({ "\n": "\u23CE", " ": "\u2423", "\t": "\u21E5", "\r": "\u240D", "": "\u2205" }[s] ?? s);

  function colour(gate, v) {
    const st = SCALES[gate];
    v = Math.min(1, Math.max(0, v));
    for (let i = 1; i < st.length; i++) {
      if (v <= st[i][0]) {
        const [a, ca] = st[i - 1], [b, cb] = st[i];
        const f = (v - a) / (b - a || 1);
        return ca.map((c, j) => Math.round(c + f * (cb[j] - c)));
      }
    }
    return st[st.length - 1][1];
  }
  const rgb = (c) => `rgb(${c[0]}, ${c[1]}, ${c[2]})`;

  function value(layer, gate, t, unit) {
    const L = D.layers[layer];
    return unit < 0 ? L[gate + "_mean"][t] : L[gate][t * L.H + unit] / 1000;
  }

  // --- build the text -------------------------------------------------------
  const text = $("text");
  const frag = document.createDocumentFragment();
  const spans = [];
  D.tokens.forEach((tok, t) => {
    if (t > 0 && D.joiner) frag.appendChild(document.createTextNode(D.joiner));
    const s = document.createElement("span");
    s.className = "tok" + (tok === "\n" ? " nl" : "") + (D.unknown[t] ? " unk" : "");
    s.textContent = tok;
    s.dataset.t = t;
    spans.push(s);
    frag.appendChild(s);
  });
  text.appendChild(frag);

  // --- controls -------------------------------------------------------------
  const H = () => D.layers[S.layer].H;
  const layerSel = $("layer");
  D.layers.forEach((L, i) => {
    const o = document.createElement("option");
    o.value = i; o.textContent = `layer ${i + 1} of ${D.layers.length}` + (i === D.layers.length - 1 ? " (top)" : "");
    layerSel.appendChild(o);
  });
  layerSel.value = S.layer;
  if (D.layers.length < 2) $("layerctl").style.display = "none";

  function syncUnitInputs() {
    const max = H() - 1;
    for (const el of [$("unit"), $("unitnum")]) { el.max = max; }
    if (S.unit > max) S.unit = max;
    const u = Math.max(0, S.unit);
    $("unit").value = u; $("unitnum").value = u;
    $("mean").checked = S.unit < 0;
    document.querySelector(".unitctl").classList.toggle("mean", S.unit < 0);
  }

  document.querySelectorAll("input[name=gate]").forEach((el) =>
    el.addEventListener("change", () => { S.gate = el.value; update(); }));
  $("mean").addEventListener("change", (e) => { S.unit = e.target.checked ? -1 : +$("unit").value; update(); });
  $("unit").addEventListener("input", (e) => { S.unit = +e.target.value; update(); });
  $("unitnum").addEventListener("input", (e) => {
    const u = parseInt(e.target.value, 10);
    if (!isNaN(u) && u >= 0 && u < H()) { S.unit = u; update(); }
  });
  layerSel.addEventListener("change", () => { S.layer = +layerSel.value; update(); });
  $("stretch").addEventListener("change", (e) => { S.stretch = e.target.checked; update(); });
  document.addEventListener("keydown", (e) => {
    if (e.target.tagName === "INPUT" || e.target.tagName === "SELECT") return;
    if (e.key === "ArrowRight" || e.key === "ArrowLeft") {
      const d = e.key === "ArrowRight" ? 1 : -1;
      S.unit = S.unit < 0 ? (d > 0 ? 0 : H() - 1) : (S.unit + d + H()) % H();
      update();
    } else if (e.key === "m") { S.unit = -1; update(); }
    else if (e.key === "z" || (e.key === "r" && HAS_R)) { S.gate = e.key; $("gate-" + e.key).checked = true; update(); }
  });

  // --- saturation scatter plots (inline SVG) --------------------------------
  function scatter(gate) {
    const sat = D.layers[S.layer][gate + "_sat"];
    const W = 300, P = 40, TOP = 24, inner = W - P - 12;
    const X = (v) => P + v * inner, Y = (v) => TOP + (1 - v) * inner;
    const HT = TOP + inner + P;
    let s = `<svg width="${W}" height="${HT}" viewBox="0 0 ${W} ${HT}" role="img" aria-label="saturation of the ${NAMES[gate]}">`;
    s += `<rect x="${X(0)}" y="${Y(1)}" width="${inner}" height="${inner}" fill="#fbfaf7" stroke="#d0cec7"/>`;
    for (const g of [0.25, 0.5, 0.75]) {
      s += `<line x1="${X(g)}" y1="${Y(0)}" x2="${X(g)}" y2="${Y(1)}" stroke="#eeece6"/>`;
      s += `<line x1="${X(0)}" y1="${Y(g)}" x2="${X(1)}" y2="${Y(g)}" stroke="#eeece6"/>`;
    }
    s += `<line x1="${X(0)}" y1="${Y(1)}" x2="${X(1)}" y2="${Y(0)}" stroke="#c9c6bd" stroke-dasharray="4 4"/>`;
    for (const g of [0, 0.5, 1]) {
      s += `<text x="${X(g)}" y="${Y(0) + 16}" font-size="11" text-anchor="middle" fill="#667085">${g}</text>`;
      s += `<text x="${X(0) - 6}" y="${Y(g) + 4}" font-size="11" text-anchor="end" fill="#667085">${g}</text>`;
    }
    s += `<text x="${X(0.5)}" y="${HT - 4}" font-size="12" text-anchor="middle" fill="#394150">fraction &lt; 0.1 (left-saturated)</text>`;
    s += `<text transform="translate(11 ${Y(0.5)}) rotate(-90)" font-size="12" text-anchor="middle" fill="#394150">fraction &gt; 0.9 (right-saturated)</text>`;
    const hi = gate === "z" ? (WRITES ? "\u2196 write every step" : "\u2196 integrators: keep") : "\u2196 use the past";
    const lo = gate === "z" ? (WRITES ? "integrators: keep \u2198" : "rewrite every step \u2198") : "reset often \u2198";
    s += `<text x="${X(0)}" y="${Y(1) - 8}" font-size="11" fill="#98a2b3">${hi}</text>`;
    s += `<text x="${X(1)}" y="${Y(1) - 8}" font-size="11" text-anchor="end" fill="#98a2b3">${lo}</text>`;
    const fill = rgb(colour(gate, 0.92)), fillLo = rgb(colour(gate, 0.08));
    let sel = "";
    sat.left.forEach((l, u) => {
      const r = sat.right[u];
      const c = r >= l ? fill : fillLo;
      const dot = `<circle class="dot${u === S.unit ? " sel" : ""}" data-unit="${u}" cx="${X(l).toFixed(1)}" cy="${Y(r).toFixed(1)}" r="${u === S.unit ? 6 : 4}" fill="${c}" fill-opacity=".8" stroke="#fff" stroke-width=".8"><title>unit ${u}: ${(100 * l).toFixed(0)}% of steps < 0.1, ${(100 * r).toFixed(0)}% > 0.9</title></circle>`;
      if (u === S.unit) sel = dot; else s += dot;
    });
    return s + sel + "</svg>";
  }
  for (const g of D.gates) {
    $("sat-" + g).addEventListener("click", (e) => {
      const u = e.target.closest && e.target.closest(".dot");
      if (u) { S.unit = +u.dataset.unit; update(); }
    });
  }

  // --- repaint ---------------------------------------------------------------
  function update() {
    syncUnitInputs();
    const vals = new Array(T);
    let lo = Infinity, hi = -Infinity;
    for (let t = 0; t < T; t++) {
      const v = value(S.layer, S.gate, t, S.unit);
      vals[t] = v; if (v < lo) lo = v; if (v > hi) hi = v;
    }
    const stretch = S.stretch && hi - lo > 1e-6;
    const a = stretch ? lo : 0, b = stretch ? hi : 1;
    for (let t = 0; t < T; t++) {
      const f = (vals[t] - a) / (b - a);
      const c = colour(S.gate, f);
      spans[t].style.backgroundColor = rgb(c);
      spans[t].style.color = Math.abs(f - 0.5) > 0.36 ? "#fff" : "";
    }
    const stops = SCALES[S.gate].map(([v, c]) => `${rgb(c)} ${100 * v}%`).join(", ");
    $("bar").style.background = `linear-gradient(90deg, ${stops})`;
    $("bar-lo").textContent = a.toFixed(2);
    $("bar-mid").textContent = NAMES[S.gate] + (S.unit < 0 ? " (mean)" : ` (unit ${S.unit})`);
    $("bar-hi").textContent = b.toFixed(2);
    $("legend-text").innerHTML = LEGEND[S.gate];
    for (const g of D.gates) $("sat-" + g).innerHTML = scatter(g);
    $("unitinfo").innerHTML = unitInfo();
  }

  function unitInfo() {
    const L = D.layers[S.layer];
    if (S.unit < 0) {
      const integ = L.z_sat[KEEP].filter((v) => v > 0.5).length;
      const rew = L.z_sat[WRITE].filter((v) => v > 0.5).length;
      const [keepZ, writeZ] = WRITES ? ["&lt;&nbsp;0.1", "&gt;&nbsp;0.9"] : ["&gt;&nbsp;0.9", "&lt;&nbsp;0.1"];
      return `<h3>all ${L.H} units</h3><p>` +
        `<span class="num">${integ}</span> unit${integ === 1 ? "" : "s"} keep their state (z&nbsp;${keepZ}) on more than half the steps; ` +
        `<span class="num">${rew}</span> rewrite it (z&nbsp;${writeZ}) on more than half.</p>` +
        `<p>Click a dot, drag the unit slider or press &larr; &rarr; to follow one unit through the text.</p>`;
    }
    const u = S.unit, pct = (v) => `<span class="num">${(100 * v).toFixed(0)}%</span>`;
    let zs = 0, rs = 0;
    for (let t = 0; t < T; t++) { zs += L.z[t * L.H + u]; if (HAS_R) rs += L.r[t * L.H + u]; }
    const kind = L.z_sat[KEEP][u] > 0.5 ? "an integrator: it mostly keeps its state"
      : L.z_sat[WRITE][u] > 0.5 ? "a fast unit: it mostly rewrites its state"
      : "a mixed unit: it keeps at some characters and rewrites at others";
    return `<h3>unit ${u}</h3><p>This unit is ${kind}.</p>` +
      `<p>update gate z: mean <span class="num">${(zs / T / 1000).toFixed(2)}</span>, ` +
      `below 0.1 at ${pct(L.z_sat.left[u])} and above 0.9 at ${pct(L.z_sat.right[u])} of the steps.` +
      (HAS_R ? `<br>reset gate r: mean <span class="num">${(rs / T / 1000).toFixed(2)}</span>, ` +
        `below 0.1 at ${pct(L.r_sat.left[u])}, above 0.9 at ${pct(L.r_sat.right[u])}.` : "") + `</p>`;
  }

  // --- tooltip ---------------------------------------------------------------
  const tip = $("tooltip");
  function fmt(v) { return v.toFixed(3); }
  function tipHTML(t) {
    const tok = D.tokens[t];
    const L = S.layer;
    const who = S.unit < 0 ? `mean of ${H()} units` : `unit ${S.unit}`;
    const z = value(L, "z", t, S.unit), r = HAS_R ? value(L, "r", t, S.unit) : null;
    const verdict = WRITES ? (z > 0.5 ? "writes" : "keeps") : (z > 0.5 ? "keeps" : "rewrites");
    let h = `<div><span class="ch">${esc(visible(tok))}</span><span class="pos">position ${t + 1} of ${T}</span></div>`;
    if (D.unknown[t]) h += `<div class="warn">not in the vocabulary: read as &lt;unk&gt;</div>`;
    h += `<div class="lbl">gates, ${esc(who)}${D.layers.length > 1 ? ", layer " + (L + 1) : ""}</div>`;
    h += `<div class="gv">z = ${fmt(z)} <span class="pos">(${verdict})</span>` + (HAS_R ? `<br>r = ${fmt(r)}` : "") + `</div>`;
    if (S.unit >= 0) h += `<div class="gv pos">mean z = ${fmt(value(L, "z", t, -1))}` +
      (HAS_R ? `, mean r = ${fmt(value(L, "r", t, -1))}` : "") + `</div>`;
    h += `<div class="lbl">next, the model guesses</div><table>`;
    const next = t + 1 < T ? D.tokens[t + 1] : null;
    for (const [k, p] of D.top[t]) {
      h += `<tr class="${k === next ? "hit" : ""}"><td class="k">${esc(visible(k))}</td>` +
           `<td style="width:100%"><div class="pb" style="width:${Math.max(2, 100 * p).toFixed(1)}%"></div></td>` +
           `<td class="p">${(100 * p).toFixed(1)}%</td></tr>`;
    }
    h += `</table>`;
    if (next !== null) h += `<div class="pos">actually next: <span class="gv">${esc(visible(next))}</span></div>`;
    return h;
  }
  function place(e) {
    const pad = 14, w = tip.offsetWidth, h = tip.offsetHeight;
    let x = e.clientX + pad, y = e.clientY + pad;
    if (x + w > window.innerWidth - 4) x = e.clientX - w - pad;
    if (y + h > window.innerHeight - 4) y = e.clientY - h - pad;
    tip.style.left = Math.max(4, x) + "px"; tip.style.top = Math.max(4, y) + "px";
  }
  text.addEventListener("mouseover", (e) => {
    const s = e.target.closest(".tok");
    if (!s) return;
    tip.innerHTML = tipHTML(+s.dataset.t);
    tip.hidden = false;
    place(e);
  });
  text.addEventListener("mousemove", (e) => { if (!tip.hidden) place(e); });
  text.addEventListener("mouseout", (e) => {
    if (!e.relatedTarget || !e.relatedTarget.closest || !e.relatedTarget.closest(".tok")) tip.hidden = true;
  });

  const Ls = D.layers.length;
  const kindOf = { gru: "GRU layer", mingru: "minGRU layer", "mingru-block": "minGRU block" }[D.cell] || D.cell + " layer";
  $("summary").textContent = `${T} tokens \u00b7 ${Ls} ${kindOf}${Ls > 1 ? "s" : ""} \u00b7 ${D.layers[Ls - 1].H} hidden units` +
    `${Ls > 1 ? " per layer" : ""} \u00b7 ` +
    (HAS_R ? `reset gate ${D.reset_after ? "after" : "before"} the matrix product \u00b7 keys: \u2190 \u2192 unit, m mean, z / r gate`
           : "update gate only, z \u2248 1 writes \u00b7 keys: \u2190 \u2192 unit, m mean");
  if (!HAS_R) { $("gate-r-label").hidden = true; $("fig-r").hidden = true; }
  if (WRITES) $("z-writes-note").hidden = false;
  update();
})();
