// The inbox: live countdowns to each deadline, and the keyboard (j/k move, Enter/o open,
// a approve, r reject, e edit, c claim, ? help). Keys never fire while typing in a field.
(function () {
  "use strict";
  var selectedId = null;

  function typing(target) {
    if (!target) return false;
    var tag = target.tagName;
    return tag === "INPUT" || tag === "TEXTAREA" || tag === "SELECT" || target.isContentEditable;
  }

  function pad(n) { return (n < 10 ? "0" : "") + n; }

  function tick() {
    var now = Date.now();
    document.querySelectorAll(".countdown[data-deadline]").forEach(function (el) {
      var ms = Date.parse(el.getAttribute("data-deadline")) - now;
      var time = el.querySelector("time");
      if (!time) return;
      var s = Math.max(0, Math.floor(Math.abs(ms) / 1000));
      var text = Math.floor(s / 3600) + ":" + pad(Math.floor(s / 60) % 60) + ":" + pad(s % 60);
      time.textContent = ms >= 0 ? "in " + text : "overdue by " + text;
      el.classList.toggle("overdue", ms < 0);
    });
    // A claim lapses by itself (nothing is written when it does): say so when its time is up.
    document.querySelectorAll("[data-claim-until]").forEach(function (el) {
      if (Date.parse(el.getAttribute("data-claim-until")) > now) return;
      el.removeAttribute("data-claim-until");
      el.classList.add("expired");
      el.textContent = "claim expired";
    });
  }

  function items() { return Array.prototype.slice.call(document.querySelectorAll("[data-item]")); }

  function select(index) {
    var all = items();
    if (!all.length) return;
    index = Math.max(0, Math.min(all.length - 1, index));
    all.forEach(function (el) { el.classList.remove("selected"); el.removeAttribute("aria-current"); });
    var el = all[index];
    el.classList.add("selected");
    el.setAttribute("aria-current", "true");
    selectedId = el.id;
    el.focus();
  }

  function currentIndex() {
    var all = items();
    for (var i = 0; i < all.length; i++) if (all[i].id === selectedId) return i;
    return -1;
  }

  function help(show) {
    var dialog = document.getElementById("keys-help");
    if (!dialog) return;
    dialog.hidden = !show;
    if (show) dialog.querySelector("button").focus();
  }

  function press(key) {
    var button = document.querySelector('[data-key="' + key + '"]');
    if (!button) return false;
    if (key === "e") {
      var details = document.getElementById("edit");
      if (details) { details.open = true; var first = details.querySelector("input, textarea, select"); if (first) first.focus(); }
      return true;
    }
    if (key === "a" || key === "r") {
      var reason = document.getElementById("reason");
      if (reason && !reason.value) reason.value = key === "a" ? "approved from the keyboard" : "rejected from the keyboard";
    }
    button.click();
    return true;
  }

  document.addEventListener("keydown", function (evt) {
    if (evt.ctrlKey || evt.metaKey || evt.altKey) return;
    var dialog = document.getElementById("keys-help");
    if (evt.key === "Escape" && dialog && !dialog.hidden) { help(false); return; }
    if (typing(evt.target)) return;
    var key = evt.key;
    if (key === "?") { help(true); evt.preventDefault(); return; }
    if (key === "j") { select(currentIndex() + 1); evt.preventDefault(); return; }
    if (key === "k") { select(currentIndex() - 1); evt.preventDefault(); return; }
    if (key === "Enter" || key === "o") {
      var el = document.getElementById(selectedId || "");
      if (el && el.getAttribute("data-href")) { window.location.href = el.getAttribute("data-href"); evt.preventDefault(); }
      return;
    }
    if ("arec".indexOf(key) >= 0 && key.length === 1) {
      if (press(key)) evt.preventDefault();
    }
  });

  document.addEventListener("click", function (evt) {
    if (evt.target && evt.target.hasAttribute && evt.target.hasAttribute("data-close-help")) help(false);
  });

  // After a live swap, keep the selection (and focus) on the same item.
  document.addEventListener("signalbox:updated", function () {
    var el = selectedId && document.getElementById(selectedId);
    if (el) { el.classList.add("selected"); el.setAttribute("aria-current", "true"); el.focus({ preventScroll: true }); }
    tick();
  });

  tick();
  setInterval(tick, 1000);
})();
