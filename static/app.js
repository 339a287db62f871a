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

  document.addEventListener("htmx:afterSwap", toBottom);
  document.addEventListener("htmx:sseMessage", toBottom);
  document.addEventListener("htmx:sseClose", (e) => {
    const art = e.target.closest && e.target.closest("[data-role=assistant]");
    if (art) art.removeAttribute("aria-busy");
  });

  function toggleSidebar(open) {
    const side = $("#sidebar"), btn = $(".menu");
    if (!side || !btn) return;
    side.classList.toggle("open", open);
    btn.setAttribute("aria-expanded", String(open));
    if (open) { const a = $("a", side); if (a) a.focus(); } else btn.focus();
  }
  document.addEventListener("click", (e) => {
    const btn = e.target.closest && e.target.closest(".menu");
    if (btn) toggleSidebar(!$("#sidebar").classList.contains("open"));
  });

  document.addEventListener("DOMContentLoaded", () => {
    const m = messages(); if (m) m.scrollTop = m.scrollHeight;
    const ta = $("#msg"); if (ta) { autosize(ta); ta.focus(); }
  });
})();
