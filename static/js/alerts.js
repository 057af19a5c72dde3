// Usage alerts pages. The rule form shows only the fields the chosen kind uses (all of them
// without JS); on the list, enabling or disabling a rule swaps the table, and the keyboard focus
// goes back to the same row's button rather than to the top of the page.
(function () {
  "use strict";
  var USED = {
    member_daily_calls: ["member", "threshold"],
    server_error_rate: ["server", "threshold", "min-calls"],
    quota_rejection: ["member"],
  };
  var ALL = ["member", "server", "threshold", "min-calls"];

  function update(form) {
    var kind = form.querySelector("select[name=kind]");
    if (!kind) return;
    var used = USED[kind.value] || ALL;
    ALL.forEach(function (name) {
      var field = form.querySelector(".alert-field-" + name);
      if (field) field.hidden = used.indexOf(name) === -1;
    });
  }

  var toggledRow = null;

  document.addEventListener("DOMContentLoaded", function () {
    var form = document.getElementById("alert-rule-form");
    if (form) {
      update(form);
      form.addEventListener("change", function (event) {
        if (event.target && event.target.name === "kind") update(form);
      });
    }
    var table = document.getElementById("alert-table");
    if (!table) return;
    table.addEventListener("htmx:beforeRequest", function (event) {
      var row = event.target.closest("tr");
      toggledRow = row ? row.id : null;
    });
    table.addEventListener("htmx:afterSwap", function () {
      if (!toggledRow) return;
      var button = document.querySelector("#" + toggledRow + " form button");
      if (button) button.focus();
      toggledRow = null;
    });
  });
})();
