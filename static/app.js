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
    ta.style.height = Math.min(ta.scrollHeight, window.innerHeight * 0.4) + "px";
  }

  document.addEventListener("keydown", (e) => {
    const ta = e.target;
    if (ta && ta.id === "msg" && e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      if (ta.value.trim()) ta.form.requestSubmit();
    } else if (e.key === "Escape") {
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
  const narrow = window.matchMedia("(max-width: 760px)");
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

  document.addEventListener("DOMContentLoaded", () => {
    labelTheme(); syncInert();
    const m = messages(); if (m) m.scrollTop = m.scrollHeight;
    const ta = $("#msg"); if (ta) { autosize(ta); ta.focus(); }
  });
})();
