// kithmail web UI: a little progressive enhancement; every page works without it.
// No inline handlers (the Content-Security-Policy forbids them): behaviour hangs off data- attributes.
"use strict";
document.addEventListener("DOMContentLoaded", function () {
  // "Select all" checkboxes: <input type="checkbox" data-select-all="NAME"> toggles every box named NAME.
  document.querySelectorAll("input[data-select-all]").forEach(function (all) {
    all.addEventListener("change", function () {
      var name = all.getAttribute("data-select-all");
      document.querySelectorAll('input[type="checkbox"][name="' + CSS.escape(name) + '"]').forEach(function (box) {
        box.checked = all.checked;
      });
    });
  });
  // Buttons that destroy something ask first: <button data-confirm="Delete these messages?">.
  document.querySelectorAll("button[data-confirm]").forEach(function (button) {
    button.addEventListener("click", function (event) {
      if (!window.confirm(button.getAttribute("data-confirm"))) {
        event.preventDefault();
      }
    });
  });
});
