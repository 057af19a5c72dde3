/* Tool playground (templates/external_mcp/playground.html): posts the arguments form and reads the
 * answer as an event stream (fetch, since EventSource cannot POST), so the upstream's progress shows
 * as it arrives. Events (external_mcp/playground_views.py):
 *   started {tool} · progress {progress, total, message} · notice {text} · answer {html}
 * The answer's HTML is rendered (and escaped) by the server; everything else is set as text.
 * An invalid form comes back as HTML (422) and replaces the form. Without this script the form
 * posts normally and the page comes back with the result.
 */
(function () {
  "use strict";

  var section = document.getElementById("playground-form");
  if (!section) return;
  var container = section.parentElement;
  var progressBox = document.getElementById("playground-progress");
  var answerBox = document.getElementById("playground-answer");
  var bar = null;

  function wire() {
    var form = document.getElementById("playground-form");
    var toggle = document.getElementById("playground-toggle");
    if (!form || !toggle) return;
    toggle.hidden = false;
    label(toggle, form);
    toggle.addEventListener("click", function () {
      var mode = form.elements.mode;
      mode.value = mode.value === "json" ? "form" : "json";
      document.getElementById("playground-fields").hidden = mode.value === "json";
      document.getElementById("playground-json").hidden = mode.value !== "json";
      label(toggle, form);
      var first = form.querySelector(mode.value === "json" ? "#playground-json textarea"
        : "#playground-fields input, #playground-fields select, #playground-fields textarea");
      if (first) first.focus();
    });
    form.addEventListener("submit", submit);
  }

  function label(toggle, form) {
    var json = form.elements.mode.value === "json";
    toggle.setAttribute("aria-pressed", json ? "true" : "false");
    toggle.textContent = json ? "Edit as form" : "Edit as JSON";
    toggle.hidden = json && !document.querySelector("#playground-fields .field");
  }

  function line(className, text) {
    var p = document.createElement("p");
    p.className = className;
    p.textContent = text;
    progressBox.appendChild(p);
  }

  function showProgress(data) {
    if (!bar) {
      bar = document.createElement("progress");
      bar.id = "playground-bar";
      bar.setAttribute("aria-label", "Tool progress");
      progressBox.insertBefore(bar, progressBox.firstChild);
    }
    if (typeof data.total === "number" && data.total > 0) {
      bar.max = data.total;
      bar.value = Math.min(data.progress || 0, data.total);
    } else {
      bar.removeAttribute("value");
    }
    var text = "Progress " + (data.progress === null ? "?" : data.progress);
    if (data.total !== null) text += " / " + data.total;
    if (data.message) text += ": " + data.message;
    line("progress-line", text);
  }

  function handle(kind, data) {
    if (kind === "started") {
      line("notice-line", "Calling " + data.tool + "…");
    } else if (kind === "progress") {
      showProgress(data);
    } else if (kind === "notice") {
      line("notice-line", data.text);
    } else if (kind === "answer") {
      answerBox.innerHTML = data.html;
    }
  }

  /* Our own stream: events end with a blank line, each with one "event:" and one "data:" line. */
  function dispatch(block) {
    var kind = "message";
    var data = "";
    block.split("\n").forEach(function (row) {
      if (row.indexOf("event: ") === 0) kind = row.slice(7);
      else if (row.indexOf("data: ") === 0) data += row.slice(6);
    });
    if (data) handle(kind, JSON.parse(data));
  }

  async function read(response) {
    var reader = response.body.getReader();
    var decoder = new TextDecoder();
    var buffer = "";
    for (;;) {
      var chunk = await reader.read();
      if (chunk.done) break;
      buffer += decoder.decode(chunk.value, {stream: true});
      var end;
      while ((end = buffer.indexOf("\n\n")) !== -1) {
        dispatch(buffer.slice(0, end));
        buffer = buffer.slice(end + 2);
      }
    }
  }

  /* The errors of an earlier submit no longer hold once these arguments are sent. */
  function clearErrors(form) {
    form.querySelectorAll(".errorlist, .alert-error").forEach(function (node) { node.remove(); });
    form.querySelectorAll(".has-error").forEach(function (node) { node.classList.remove("has-error"); });
    form.querySelectorAll("[aria-invalid]").forEach(function (node) {
      node.removeAttribute("aria-invalid");
      var described = (node.getAttribute("aria-describedby") || "").split(" ").filter(function (id) {
        return id && !/_error$/.test(id);
      });
      if (described.length) node.setAttribute("aria-describedby", described.join(" "));
      else node.removeAttribute("aria-describedby");
    });
  }

  async function submit(event) {
    event.preventDefault();
    var form = event.target;
    var button = document.getElementById("playground-submit");
    button.disabled = true;
    clearErrors(form);
    progressBox.textContent = "";
    answerBox.textContent = "";
    bar = null;
    try {
      var response = await fetch(form.action, {
        method: "POST", body: new FormData(form), credentials: "same-origin",
        headers: {"Accept": "text/event-stream", "X-CSRFToken": form.elements.csrfmiddlewaretoken.value},
      });
      var type = response.headers.get("Content-Type") || "";
      if (type.indexOf("text/event-stream") === 0) {
        await read(response);
      } else if (type.indexOf("text/html") === 0 && response.status === 422) {
        var holder = document.createElement("div");
        holder.innerHTML = await response.text();
        var fresh = holder.querySelector("#playground-form");
        if (fresh) {
          container.replaceChild(fresh, form);
          wire();
          var invalid = fresh.querySelector("[aria-invalid=true]");
          if (invalid) invalid.focus();
        }
      } else {
        line("notice-line", "The call could not be made (HTTP " + response.status + "). Reload the page and try again.");
      }
    } catch (error) {
      line("notice-line", "The connection to TwinMCP was lost before the answer arrived.");
    } finally {
      var current = document.getElementById("playground-submit");
      if (current) current.disabled = false;
    }
  }

  wire();
})();
