// Applies the remembered colour theme before the page paints (loaded without defer, in <head>).
(function () {
  try {
    var t = localStorage.getItem("theme");
    if (t === "light" || t === "dark") document.documentElement.setAttribute("data-theme", t);
  } catch (e) { /* storage may be blocked: follow the system setting */ }
})();
