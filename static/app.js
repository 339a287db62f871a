// Agent chat: the little behaviour HTML and htmx do not cover. No inline scripts, no eval (CSP).
(function () {
  "use strict";
  const $ = (sel, root) => (root || document).querySelector(sel);
  let stick = true; // follow the newest text until the user scrolls up

  function messages() { return $("#messages"); }
  function nearBottom(el) { return el.scrollHeight - el.scrollTop - el.clientHeight < 80; }
  function toBottom() { const m = messages(); if (m && stick) m.scrollTop = m.scrollHeight; }

  function autosize(ta) {
    ta.style.height = "auto"; // CSSOM writes are allowed by CSP; only style attributes in HTML are not
    const share = window.innerHeight < 600 ? 0.25 : 0.4; // a phone's screen stays the chat's
    ta.style.height = Math.min(ta.scrollHeight, window.innerHeight * share) + "px";
  }

  // A touch keyboard's Enter key is its only way to start a new line, so there it does that and
  // the Send button sends; with a keyboard and a fine pointer, Enter sends.
  const touchKeyboard = window.matchMedia("(pointer: coarse)");
  document.addEventListener("keydown", (e) => {
    const ta = e.target;
    if (ta && ta.id === "msg" && e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      if (touchKeyboard.matches && !(e.ctrlKey || e.metaKey)) return;
      e.preventDefault();
      if (ta.value.trim()) ta.form.requestSubmit();
    } else if (e.key === "Escape" && !(ta && ta.closest && ta.closest("dialog[open]")) &&
               !(typing(ta) && ta.id !== "msg")) {
      // (Esc in the search box clears it, in a form cancels it: only elsewhere does it stop.)
      const stops = document.querySelectorAll(".reply-foot .stop");
      if (stops.length) { e.preventDefault(); stops[stops.length - 1].click(); }
      const side = $("#sidebar.open");
      if (side) toggleSidebar(false);
    }
  });

  document.addEventListener("input", (e) => { if (e.target.id === "msg") autosize(e.target); });

  document.addEventListener("scroll", (e) => {
    if (e.target === messages()) stick = nearBottom(e.target);
  }, true);

  document.addEventListener("htmx:beforeRequest", (e) => {
    if (e.target.id === "composer") $("#composer-error").textContent = "";
  });

  document.addEventListener("htmx:afterRequest", (e) => {
    if (e.target.id !== "composer") return;
    const ta = $("#msg");
    if (e.detail.successful) {
      // Only a committed message clears the box: on an error the text stays to fix and resend.
      ta.value = ""; autosize(ta); stick = true; toBottom();
    }
    ta.focus();
  });

  // Compare: the next message goes to every ticked model. The state is said beside "Compare",
  // and once such a message is sent, comparing is off again (it is one message, not a mode).
  function compareState() {
    const boxes = document.querySelectorAll("#composer input[name=compare]");
    const on = Array.from(boxes).filter((b) => b.checked).length;
    const state = $("#compare-state"), form = $("#composer");
    if (state) state.textContent = on >= 2 ? ` · on: next message to ${on} models` : on === 1 ? " · tick one more model" : "";
    if (form) form.classList.toggle("comparing", on >= 2);
    return on;
  }
  document.addEventListener("change", (e) => { if (e.target.name === "compare") compareState(); });
  document.addEventListener("htmx:afterRequest", (e) => {
    if (e.target.id !== "composer" || !e.detail.successful) return;
    document.querySelectorAll("#composer input[name=compare]").forEach((b) => { b.checked = false; });
    const pick = $(".compare-pick"); if (pick) pick.open = false;
    compareState();
  });
  document.addEventListener("DOMContentLoaded", compareState);

  document.addEventListener("htmx:afterSwap", toBottom);
  document.addEventListener("htmx:sseMessage", toBottom);
  document.addEventListener("htmx:sseClose", (e) => {
    const art = e.target.closest && e.target.closest("[data-role=assistant]");
    if (art) art.removeAttribute("aria-busy");
  });

  // On narrow screens the closed sidebar is off-canvas: inert, so Tab never lands in it.
  // (The same query as app.css's compact layout: phones upright, and phones on their side.)
  const narrow = window.matchMedia("(max-width: 760px), (max-height: 500px)");
  function syncInert() {
    const side = $("#sidebar");
    if (side) side.inert = narrow.matches && !side.classList.contains("open");
  }
  narrow.addEventListener("change", syncInert);

  function toggleSidebar(open) {
    const side = $("#sidebar"), btn = $(".menu");
    if (!side || !btn) return;
    side.classList.toggle("open", open);
    syncInert();
    btn.setAttribute("aria-expanded", String(open));
    if (open) { const a = $("a", side); if (a) a.focus(); } else btn.focus();
  }
  document.addEventListener("click", (e) => {
    const btn = e.target.closest && e.target.closest(".menu");
    if (btn) { toggleSidebar(!$("#sidebar").classList.contains("open")); return; }
    // A tap outside the open sidebar (on the dimmed page) closes it.
    const side = $("#sidebar.open");
    if (side && !side.contains(e.target)) toggleSidebar(false);
  });

  // Copy: buttons with data-copy="ID" copy that element's text; code blocks get their own.
  async function copyText(text) {
    try { await navigator.clipboard.writeText(text); return true; } catch (e) {
      const ta = document.createElement("textarea");
      ta.value = text; ta.setAttribute("readonly", ""); ta.className = "visually-hidden";
      document.body.appendChild(ta); ta.select();
      const ok = document.execCommand("copy"); ta.remove(); return ok;
    }
  }
  async function copyFrom(url) {
    const source = fetch(url, {credentials: "same-origin"}).then((r) => {
      if (!r.ok) throw new Error("HTTP " + r.status);
      return r.text();
    });
    try {
      // A ClipboardItem given a promise is written within the click's user activation, which
      // a fetch could otherwise outlast (Safari asks for this form).
      const blob = source.then((t) => new Blob([t], {type: "text/plain"}));
      await navigator.clipboard.write([new ClipboardItem({"text/plain": blob})]);
      return true;
    } catch (e) {
      try { return await copyText(await source); } catch (err) { return false; }
    }
  }
  function flash(btn, ok) {
    const label = btn.dataset.label || btn.textContent;
    btn.dataset.label = label;
    btn.textContent = ok ? "Copied" : "Copy failed";
    setTimeout(() => { btn.textContent = label; }, 1500);
  }
  document.addEventListener("click", async (e) => {
    const btn = e.target.closest && e.target.closest("[data-copy], .copy-code");
    if (!btn) return;
    let text = "";
    if (btn.dataset.copyUrl) {
      // A reply copies as the Markdown it was written in (tables, fences), fetched on demand.
      flash(btn, await copyFrom(btn.dataset.copyUrl));
      return;
    }
    if (btn.classList.contains("copy-code")) {
      // The server renders each code box with its header (chat/markdown.py): copy its code.
      const box = btn.closest(".code-block");
      const code = box && box.querySelector("pre code");
      text = code ? code.textContent : "";
    } else {
      const el = document.getElementById(btn.dataset.copy);
      if (el) {
        const clone = el.cloneNode(true);
        clone.querySelectorAll(".code-head").forEach((b) => b.remove());
        text = clone.innerText.trim();
      }
    }
    flash(btn, await copyText(text));
  });

  // Theme: system -> light -> dark, remembered in localStorage (theme.js applies it early).
  const THEMES = ["system", "light", "dark"];
  function currentTheme() { return document.documentElement.getAttribute("data-theme") || "system"; }
  function labelTheme() {
    const b = $("[data-theme-toggle]");
    if (b) b.setAttribute("aria-label", "Colour theme: " + currentTheme());
  }
  document.addEventListener("click", (e) => {
    if (!(e.target.closest && e.target.closest("[data-theme-toggle]"))) return;
    const next = THEMES[(THEMES.indexOf(currentTheme()) + 1) % THEMES.length];
    if (next === "system") document.documentElement.removeAttribute("data-theme");
    else document.documentElement.setAttribute("data-theme", next);
    try { if (next === "system") localStorage.removeItem("theme"); else localStorage.setItem("theme", next); } catch (err) { /* ignore */ }
    labelTheme();
  });

  // Esc inside an edit or rename form cancels it.
  document.addEventListener("keydown", (e) => {
    if (e.key !== "Escape") return;
    const form = e.target.closest && e.target.closest(".edit-form, .rename-form");
    if (!form) return;
    const cancel = form.querySelector("button.cancel, .edit-actions button[type=button]");
    if (cancel) { e.stopPropagation(); cancel.click(); }
  }, true);

  // Polish: timestamps, jump to latest, shortcuts and their dialog, the header's panel, the model
  // badge, the length counter, "Load earlier" keeping the reader's place, focus after Esc. ------
  function typing(el) {
    return !!el && (el.isContentEditable || /^(INPUT|TEXTAREA|SELECT)$/.test(el.tagName));
  }

  // Timestamps: <time datetime> from the server, shown relative; the exact time on hover.
  function relative(date, now) {
    const s = Math.round((now - date) / 1000);
    if (s < 45) return "just now";
    const m = Math.round(s / 60);
    if (m < 60) return m + " min ago";
    const h = Math.round(m / 60);
    if (h < 24) return h + (h === 1 ? " hour ago" : " hours ago");
    const d = Math.round(h / 24);
    if (d === 1) return "yesterday";
    if (d < 7) return d + " days ago";
    const opts = {day: "numeric", month: "short"};
    if (date.getFullYear() !== new Date(now).getFullYear()) opts.year = "numeric";
    return date.toLocaleDateString(undefined, opts);
  }
  function stamps() {
    const now = Date.now();
    document.querySelectorAll("time.stamp[datetime]").forEach((t) => {
      const d = new Date(t.getAttribute("datetime"));
      if (isNaN(d)) return;
      const text = relative(d, now);
      if (t.textContent !== text) t.textContent = text;
      t.title = d.toLocaleString(undefined, {dateStyle: "full", timeStyle: "medium"});
    });
  }
  setInterval(stamps, 30000);

  // "Jump to latest": shown while the reader is away from the bottom (also as a reply grows).
  function syncJump() {
    const m = messages(), b = $("#jump-latest");
    if (m && b) b.hidden = nearBottom(m);
  }
  document.addEventListener("scroll", (e) => { if (e.target === messages()) syncJump(); }, true);
  document.addEventListener("click", (e) => {
    if (!(e.target.closest && e.target.closest("#jump-latest"))) return;
    const m = messages();
    if (!m) return;
    stick = true; m.scrollTop = m.scrollHeight; syncJump();
    const ta = $("#msg");
    if (ta && !touchKeyboard.matches) ta.focus(); // the button has gone: focus where one types
  });

  // The header's second row (token total, export) is a panel behind "⋯" on small screens.
  function toggleMore(open) {
    const btn = $(".topbar .more"), panel = $("#topbar-more");
    if (!btn || !panel) return;
    panel.classList.toggle("open", open);
    btn.setAttribute("aria-expanded", String(open));
  }
  document.addEventListener("click", (e) => {
    const btn = e.target.closest && e.target.closest(".topbar .more");
    if (btn) { toggleMore(btn.getAttribute("aria-expanded") !== "true"); return; }
    const panel = $("#topbar-more.open");
    if (panel && !panel.contains(e.target)) toggleMore(false);
  });

  // The header's badge names the model the picker has chosen (also when a reload restored it).
  function syncBadge() {
    const pick = $("#model"), badge = $("#model-badge");
    if (!pick || !badge || badge.textContent === pick.value) return;
    badge.textContent = pick.value; badge.title = pick.value;
    badge.classList.remove("demo");
  }
  document.addEventListener("change", (e) => { if (e.target.id === "model") syncBadge(); });

  // Length: a counter near the limit, and a clear message (and no send) over it.
  // Every message box with data-max-chars (the composer, an edit) has its counter in the
  // element its aria-describedby names.
  function countChars(ta) {
    const max = Number(ta.dataset.maxChars);
    const out = document.getElementById(ta.getAttribute("aria-describedby") || "");
    if (!max || !out) return false;
    const n = [...ta.value].length; // code points, as the server counts
    const over = n - max;
    const fmt = (x) => x.toLocaleString("en");
    out.classList.toggle("over", over > 0);
    if (over > 0) {
      out.textContent = `${fmt(n)} / ${fmt(max)} characters: ${fmt(over)} over the limit. ` +
        "Shorten the message to send it.";
      ta.setAttribute("aria-invalid", "true");
    } else {
      out.textContent = n >= max * 0.9 ? `${fmt(n)} / ${fmt(max)} characters` : "";
      ta.removeAttribute("aria-invalid");
    }
    return over > 0;
  }
  document.addEventListener("input", (e) => {
    if (e.target.dataset && e.target.dataset.maxChars) countChars(e.target);
  });
  document.addEventListener("htmx:afterRequest", (e) => {
    const ta = $("#msg");
    if (e.target.id === "composer" && ta) countChars(ta); // a sent message has left the box
  });
  document.addEventListener("htmx:confirm", (e) => {
    const ta = e.target.querySelector && e.target.querySelector("textarea[data-max-chars]");
    if (ta && countChars(ta)) { e.preventDefault(); ta.focus(); }
  });

  // "Load earlier" keeps the message the reader was looking at where it was.
  let anchor = null;
  // Esc or Cancel out of an edit or a rename gives focus back to the button that opened it.
  let refocus = null;
  document.addEventListener("htmx:beforeSwap", (e) => {
    const target = e.detail.target, m = messages();
    if (target && target.id === "earlier" && m) {
      const top = m.getBoundingClientRect().top;
      const first = [...m.querySelectorAll(".msg")].find((el) => el.getBoundingClientRect().bottom > top);
      anchor = first ? {el: first, y: first.getBoundingClientRect().top} : null;
    }
    if (target && target.matches && target.matches(".editing") && target.contains(document.activeElement)) {
      refocus = target.id;
    }
  });
  document.addEventListener("htmx:afterSwap", () => {
    const m = messages();
    if (anchor && m) {
      m.scrollTop += anchor.el.getBoundingClientRect().top - anchor.y;
      stick = nearBottom(m);
      const more = $("#earlier a");
      if (more && document.activeElement === document.body) more.focus({preventScroll: true});
    }
    anchor = null;
    if (refocus) {
      const el = document.getElementById(refocus);
      refocus = null;
      if (!el) return;
      // (Until htmx settles, the new element still wears the old one's classes.)
      const btn = el.matches(".conv")
        ? $(".conv-actions button", el)
        : [...el.querySelectorAll(".msg-tools button")].find((b) => b.textContent.trim() === "Edit");
      if (!btn) return;
      el.classList.add("refocus"); // its actions show on hover or focus: shown while focusing
      btn.focus();
      el.classList.remove("refocus");
    }
  });

  // Keyboard shortcuts, listed in the dialog that ? (or Ctrl+/) opens.
  let helpOpener = null;
  function openHelp() {
    const d = $("#shortcuts");
    if (!d || d.open) return;
    helpOpener = document.activeElement;
    d.showModal();
  }
  document.addEventListener("close", (e) => {
    if (e.target.id !== "shortcuts") return;
    if (helpOpener && helpOpener.isConnected && helpOpener !== document.body) helpOpener.focus();
    helpOpener = null;
  }, true);
  // A modal dialog keeps the page inert, but Tab would still leave for the browser's own bar.
  document.addEventListener("keydown", (e) => {
    const d = $("dialog[open]");
    if (e.key !== "Tab" || !d) return;
    const stops = [...d.querySelectorAll("button, a[href], input, select, textarea, [tabindex]")]
      .filter((el) => !el.disabled && el.tabIndex >= 0);
    if (!stops.length) return;
    const first = stops[0], last = stops[stops.length - 1];
    if (e.shiftKey ? document.activeElement === first || !d.contains(document.activeElement)
                   : document.activeElement === last) {
      e.preventDefault();
      (e.shiftKey ? last : first).focus();
    }
  });
  document.addEventListener("click", (e) => {
    if (e.target.closest && e.target.closest(".shortcuts-open")) { openHelp(); return; }
    const d = $("#shortcuts[open]");
    if (d && e.target === d) d.close(); // a click on the backdrop
  });
  function focusSearch() {
    const box = $("#search");
    if (!box) return;
    if (narrow.matches && !$("#sidebar.open")) toggleSidebar(true);
    box.focus(); box.select();
  }
  document.addEventListener("keydown", (e) => {
    if (e.defaultPrevented || e.isComposing || $("dialog[open]")) return;
    const mod = (e.ctrlKey || e.metaKey) && !e.altKey, key = e.key.toLowerCase();
    if (mod && e.shiftKey && key === "o") {
      e.preventDefault();
      const a = $(".new-chat");
      if (a) window.location.assign(a.href);
    } else if ((mod && !e.shiftKey && key === "k") || (e.key === "/" && !mod && !typing(e.target))) {
      e.preventDefault(); focusSearch();
    } else if ((mod && e.key === "/") || (e.key === "?" && !mod && !typing(e.target))) {
      e.preventDefault(); openHelp();
    } else if (e.key === "Escape" && $("#topbar-more.open")) {
      const inside = $("#topbar-more").contains(document.activeElement);
      toggleMore(false);
      if (inside) $(".topbar .more").focus(); // the panel hid what had focus
    }
  });

  document.addEventListener("htmx:afterSwap", () => {
    stamps(); syncJump();
    document.querySelectorAll("textarea[data-max-chars]").forEach(countChars); // an edit opened
  });
  document.addEventListener("htmx:oobAfterSwap", stamps);
  document.addEventListener("htmx:sseMessage", (e) => {
    syncJump();
    if (e.detail && e.detail.type === "end") stamps();
  });
  document.addEventListener("DOMContentLoaded", () => {
    stamps(); syncJump(); syncBadge();
    const ta = $("#msg");
    if (ta) {
      countChars(ta);
      // The long hint does not fit a phone's line, and a touch keyboard's Enter adds a line.
      if (touchKeyboard.matches || narrow.matches) ta.placeholder = "Message";
      if (touchKeyboard.matches) ta.removeAttribute("aria-keyshortcuts");
    }
  });

  document.addEventListener("DOMContentLoaded", () => {
    labelTheme(); syncInert();
    const m = messages(); if (m) m.scrollTop = m.scrollHeight;
    const ta = $("#msg"); if (ta) { autosize(ta); ta.focus(); }
  });
})();

// Attachments (components/attachments.py): attach by button, drop or paste; chips; lightbox.
// Each file is uploaded at once (POST, multipart) and comes back as a chip whose hidden input
// puts its id in the send form; the server judges every file, this only spares a round trip.
(function () {
  "use strict";
  const input = () => document.getElementById("att-input");
  const tray = () => document.getElementById("att-tray");
  const errorBox = () => document.getElementById("composer-error");

  function sizeText(n) {
    return n < 1000 ? n + " bytes" : n < 1e6 ? Math.round(n / 1000) + " KB" : (n / 1e6).toFixed(1) + " MB";
  }
  function say(text) {
    const p = document.createElement("p");
    p.className = "error"; p.textContent = text;
    errorBox().appendChild(p);
  }

  async function attach(files) {
    const inp = input(), box = tray();
    if (!inp || !box || !files.length) return;
    const max = Number(inp.dataset.maxCount), maxBytes = Number(inp.dataset.maxBytes);
    errorBox().textContent = "";
    for (const file of files) {
      if (box.querySelectorAll(".att-chip").length >= max) {
        say("A message can carry " + max + " files at most. Remove one to attach another.");
        break;
      }
      if (file.size > maxBytes) {
        say((file.name || "That file") + " is " + sizeText(file.size) + "; the limit is " + sizeText(maxBytes) + ".");
        continue;
      }
      const chip = document.createElement("div");
      chip.className = "att-chip uploading"; chip.setAttribute("role", "listitem");
      chip.setAttribute("aria-busy", "true");
      const label = document.createElement("span");
      label.className = "att-name"; label.textContent = "Uploading " + (file.name || "file") + "…";
      chip.appendChild(label); box.appendChild(chip);
      const body = new FormData();
      body.append("file", file, file.name || "pasted.png");
      try {
        const r = await fetch(inp.dataset.upload, {
          method: "POST", body: body, credentials: "same-origin", headers: { "HX-Request": "true" },
        });
        const html = await r.text();
        if (r.ok) {
          chip.insertAdjacentHTML("afterend", html);
          const made = chip.nextElementSibling;
          if (made && window.htmx) htmx.process(made);
        } else {
          // The server's refusal is its own escaped fragment: <p class="error">why</p>.
          errorBox().insertAdjacentHTML("beforeend", html);
        }
      } catch (err) {
        say("Could not upload " + (file.name || "the file") + ". Check the connection and try again.");
      }
      chip.remove();
    }
  }

  document.addEventListener("change", (e) => {
    if (e.target.id !== "att-input") return;
    attach(Array.from(e.target.files || []));
    e.target.value = ""; // the same file can be chosen again after removing it
  });

  // Drag and drop anywhere on the chat page.
  const hasFiles = (e) => e.dataTransfer && Array.from(e.dataTransfer.types || []).includes("Files");
  document.addEventListener("dragover", (e) => {
    if (!hasFiles(e) || !input()) return;
    e.preventDefault();
    e.dataTransfer.dropEffect = "copy";
    document.body.classList.add("dropping");
  });
  document.addEventListener("dragleave", (e) => {
    if (!e.relatedTarget) document.body.classList.remove("dropping");
  });
  document.addEventListener("drop", (e) => {
    document.body.classList.remove("dropping");
    if (!hasFiles(e) || !input()) return;
    e.preventDefault();
    attach(Array.from(e.dataTransfer.files || []));
  });

  // Pasting files (a screenshot, an image copied from a page) into the message box.
  document.addEventListener("paste", (e) => {
    if (!e.target.closest || !e.target.closest("#composer") || !e.clipboardData) return;
    const files = Array.from(e.clipboardData.files || []);
    if (!files.length) return;
    // Text that comes with the files (a copied page) still pastes; files alone do not.
    if (!e.clipboardData.types.includes("text/plain")) e.preventDefault();
    attach(files);
  });

  // A message sent while a file is still uploading would leave it behind: wait for it.
  document.addEventListener("htmx:beforeRequest", (e) => {
    if (e.target.id !== "composer" || !tray() || !tray().querySelector(".uploading")) return;
    e.preventDefault();
    say("Wait a moment: a file is still uploading.");
  });

  // Files alone are a message too: the box is not required while the tray holds some, and
  // Enter in an empty box sends them (the box's own Enter handler sends only text).
  function syncRequired() {
    const ta = document.getElementById("msg"), box = tray();
    if (ta && box) ta.required = !box.querySelector(".att-chip");
  }
  function watchTray() {
    if (tray()) new MutationObserver(syncRequired).observe(tray(), { childList: true });
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", watchTray);
  else watchTray();
  document.addEventListener("keydown", (e) => {
    const ta = e.target;
    if (!ta || ta.id !== "msg" || e.key !== "Enter" || e.shiftKey || e.isComposing) return;
    const box = tray();
    if (!ta.value.trim() && box && box.querySelector(".att-chip:not(.uploading)")) {
      e.preventDefault();
      ta.form.requestSubmit();
    }
  });

  // A sent message takes its files along: the tray empties with the box.
  document.addEventListener("htmx:afterRequest", (e) => {
    if (e.target.id === "composer" && e.detail.successful && tray()) tray().textContent = "";
  });
  // A removed chip leaves the focus on the box rather than nowhere (before the swap: a removed
  // element's own events no longer reach the document).
  document.addEventListener("htmx:beforeSwap", (e) => {
    const t = e.detail.target;
    if (t && t.classList && t.classList.contains("att-chip")) {
      const ta = document.getElementById("msg"); if (ta) ta.focus();
    }
  });

  // An image in a message opens full size over the page; Esc, a click or Close shuts it.
  document.addEventListener("click", (e) => {
    const link = e.target.closest && e.target.closest("a[data-lightbox]");
    if (!link || e.ctrlKey || e.metaKey || e.shiftKey) return;
    e.preventDefault();
    const dialog = document.createElement("dialog");
    dialog.className = "lightbox";
    const img = document.createElement("img");
    img.src = link.href; img.alt = link.title || "";
    const close = document.createElement("button");
    close.type = "button"; close.textContent = "Close";
    dialog.append(img, close);
    dialog.addEventListener("click", () => dialog.close());
    dialog.addEventListener("close", () => { dialog.remove(); link.focus(); });
    document.body.appendChild(dialog);
    dialog.showModal();
  });
})();
// End of attachments
