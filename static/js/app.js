/* TwinMCP UI behaviour, loaded on every page after htmx. No inline script anywhere (the CSP forbids it).
 *
 * - Polling: an element with data-poll-interval="<ms>" and hx-trigger="refresh" is refreshed every
 *   <ms> milliseconds, but only while the tab is visible, and at once when the tab becomes visible
 *   again (htmx's own "every 30s [cond]" trigger would need eval, which the CSP forbids).
 * - Copy buttons: <button data-copy-target="#id"> copies that element's text (clipboard API).
 * - Failed htmx requests show a message in their target instead of failing silently.
 */
(function () {
  "use strict";

  var timers = new WeakMap();

  function visible() {
    return document.visibilityState === "visible";
  }

  function refresh(el) {
    if (window.htmx && document.body.contains(el)) {
      window.htmx.trigger(el, "refresh");
    }
  }

  function startPolling(el) {
    if (timers.has(el)) return;
    var ms = parseInt(el.getAttribute("data-poll-interval"), 10);
    if (!(ms > 0)) return;
    var id = window.setInterval(function () {
      if (!document.body.contains(el)) {
        window.clearInterval(id);
        timers.delete(el);
        return;
      }
      if (visible()) refresh(el);
    }, ms);
    timers.set(el, id);
  }

  function scan(root) {
    if (!root || !root.querySelectorAll) return;
    if (root.matches && root.matches("[data-poll-interval]")) startPolling(root);
    root.querySelectorAll("[data-poll-interval]").forEach(startPolling);
  }

  document.addEventListener("visibilitychange", function () {
    if (visible()) document.querySelectorAll("[data-poll-interval]").forEach(refresh);
  });

  function copyText(text) {
    if (navigator.clipboard && window.isSecureContext) {
      return navigator.clipboard.writeText(text);
    }
    return new Promise(function (resolve, reject) {
      var area = document.createElement("textarea");
      area.value = text;
      area.setAttribute("readonly", "");
      area.className = "visually-hidden";
      document.body.appendChild(area);
      area.select();
      var ok = false;
      try { ok = document.execCommand("copy"); } catch (e) { ok = false; }
      document.body.removeChild(area);
      if (ok) { resolve(); } else { reject(new Error("copy refused")); }
    });
  }

  document.addEventListener("click", function (event) {
    var button = event.target.closest ? event.target.closest("[data-copy-target]") : null;
    if (!button) return;
    var source = document.querySelector(button.getAttribute("data-copy-target"));
    if (!source) return;
    var status = document.getElementById(button.getAttribute("data-copy-status") || "");
    copyText(source.textContent.trim()).then(function () {
      button.setAttribute("data-copied", "true");
      if (status) status.textContent = "Copied to the clipboard.";
    }, function () {
      if (status) status.textContent = "Copy failed: select the text and copy it yourself.";
    });
  });

  function showError(event, text) {
    var target = event.detail.target;
    // A failed poll keeps what is on screen; the next poll tries again.
    if (!target || (event.detail.elt && event.detail.elt.hasAttribute("data-poll-interval"))) return;
    var box = document.createElement("p");
    box.className = "alert alert-error";
    box.setAttribute("role", "alert");
    box.textContent = text;
    target.replaceChildren(box);
  }

  document.addEventListener("htmx:responseError", function (event) {
    var xhr = event.detail.xhr;
    var why = xhr.status === 403 ? "You are not allowed to do this." :
      xhr.status === 404 ? "Not found: it may have been deleted." : "The server could not do this right now.";
    showError(event, why + " (HTTP " + xhr.status + ")");
  });

  document.addEventListener("htmx:sendError", function (event) {
    showError(event, "TwinMCP could not be reached; check your connection and try again.");
  });

  function init() {
    if (window.htmx) {
      window.htmx.onLoad(scan);
    } else {
      scan(document);
    }
  }

  init();
})();
