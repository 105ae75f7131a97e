// Live pages (home, inbox): shows "live" / "offline — reconnecting", tracks the newest event id
// the page reflects, and asks the server to re-render from the database after a reconnect or
// when a fragment arrives older than what is shown (a gap).
(function () {
  "use strict";
  var lastId = 0;
  var socket = null;
  var everClosed = false;

  function setState(text, live) {
    document.querySelectorAll("[data-live-state]").forEach(function (el) {
      el.textContent = text;
      el.classList.toggle("is-live", live);
      el.classList.toggle("is-offline", !live);
    });
  }

  function catchUp() {
    if (socket) socket.send(JSON.stringify({ catchup: lastId }));
  }

  function init() {
    var root = document.querySelector("[data-live]");
    if (!root) return;
    lastId = parseInt(root.getAttribute("data-last-event") || "0", 10);
    document.body.addEventListener("htmx:wsOpen", function (evt) {
      socket = evt.detail.socketWrapper;
      setState("live", true);
      if (everClosed) catchUp();
    });
    document.body.addEventListener("htmx:wsClose", function (evt) {
      everClosed = true;
      // The server's own close codes (console.live_auth) end the stream: htmx does not retry.
      var code = evt.detail && evt.detail.event ? evt.detail.event.code : 0;
      if (code === 4401) setState("offline — signed out; log in again", false);
      else if (code === 4403) setState("offline — no longer allowed", false);
      else setState("offline — reconnecting", false);
    });
    document.body.addEventListener("htmx:wsError", function () {
      setState("offline — reconnecting", false);
    });
    document.body.addEventListener("htmx:wsAfterMessage", function () {
      var marked = document.querySelector("[data-event-id]");
      var id = marked ? parseInt(marked.getAttribute("data-event-id") || "0", 10) : 0;
      if (id < lastId) catchUp();
      else lastId = id;
      document.dispatchEvent(new CustomEvent("signalbox:updated"));
    });
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
