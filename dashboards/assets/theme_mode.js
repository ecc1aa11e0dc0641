// Follow the system's light/dark setting: ag-grid's built-in theme switches on this attribute
// (the page CSS and the charts follow prefers-color-scheme directly).
(function () {
  var query = window.matchMedia("(prefers-color-scheme: dark)");
  function apply() { document.documentElement.setAttribute("data-ag-theme-mode", query.matches ? "dark" : "light"); }
  apply();
  query.addEventListener("change", apply);
})();
