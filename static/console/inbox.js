// The inbox: live countdowns to each deadline, and the keyboard (j/k move, Enter/o open,
// a approve, r reject, e edit, c claim, ? help). Keys never fire while typing in a field.
// On the list, a/r/e open the selected item's decision form with the reason (or the first field)
// focused, and Enter there confirms; c claims the selected item at once. On an item's page the
// keys act on that item.
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

  function announce(text) {
    var status = document.getElementById("keys-status");
    if (status) status.textContent = text;
  }

  function selectedRow() {
    var el = selectedId && document.getElementById(selectedId);
    return el && el.hasAttribute("data-item") ? el : null;
  }

  // On the list: act on the selected row. Returns whether the key was handled.
  function onRow(key) {
    var row = selectedRow();
    if (!row) { announce("Select an item first: j and k move through the list."); return true; }
    var label = "#" + row.id.replace("item-", "");
    if (row.classList.contains("not-actionable")) {
      var who = row.querySelector(".who");
      announce(label + " is not yours to act on" + (who ? ": " + who.textContent : "."));
      return true;
    }
    if (key === "c") { claim(row, label); return true; }
    if (key === "r" && row.getAttribute("data-kind") !== "approval") {
      announce(label + " is an escalation: open it (o) to retry, skip or abort it.");
      return true;
    }
    window.location.href = row.getAttribute("data-href") + "?do=" + key;
    return true;
  }

  function claim(row, label) {
    var token = document.querySelector('input[name="csrfmiddlewaretoken"]');
    var body = new FormData();
    body.append("op", "claim");
    if (token) body.append("csrfmiddlewaretoken", token.value);
    announce("Claiming " + label + "…");
    fetch(row.getAttribute("data-href"), { method: "POST", body: body, credentials: "same-origin" })
      .then(function (response) {
        if (response.ok) { announce("You claimed " + label + "."); return null; }
        return response.text().then(function (html) {
          var doc = new DOMParser().parseFromString(html, "text/html");
          var error = doc.getElementById("item-error");
          announce("Could not claim " + label + ": " + (error ? error.textContent : response.status));
        });
      })
      .catch(function () { announce("Could not claim " + label + ": the server did not answer."); });
  }

  // On an item's page opened from the list with ?do=<key>: the form focused, Enter confirms.
  var armed = null;

  function arm(key) {
    if (key === "e") {
      var details = document.getElementById("edit");
      if (!details) return;
      details.open = true;
      var first = details.querySelector("input:not([type=hidden]), textarea, select");
      if (first) first.focus();
      return;
    }
    var button = document.querySelector('[data-key="' + key + '"]');
    var reason = document.getElementById("reason");
    if (!button || !reason) return;
    armed = button;
    button.classList.add("armed");
    reason.setAttribute("aria-describedby", "armed-hint");
    var hint = document.getElementById("armed-hint");
    if (hint) { hint.textContent = "Give a reason, then Enter to " + button.textContent.toLowerCase() + " (Esc cancels)."; hint.hidden = false; }
    reason.focus();
  }

  function disarm() {
    if (!armed) return;
    armed.classList.remove("armed");
    armed = null;
    var hint = document.getElementById("armed-hint");
    if (hint) hint.hidden = true;
  }

  function press(key) {
    var button = document.querySelector('[data-key="' + key + '"]');
    if (!button) return false;
    if (key === "e") {
      var details = document.getElementById("edit");
      if (details) { details.open = true; var first = details.querySelector("input:not([type=hidden]), textarea, select"); if (first) first.focus(); }
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
    if (armed && evt.target && evt.target.id === "reason") {
      if (evt.key === "Enter") { evt.preventDefault(); armed.click(); return; }
      if (evt.key === "Escape") { disarm(); evt.target.blur(); return; }
    }
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
      var handled = document.getElementById("item-page") ? press(key) : onRow(key);
      if (handled) evt.preventDefault();
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

  var todo = new URLSearchParams(window.location.search).get("do");
  if (todo && document.getElementById("item-page") && "are".indexOf(todo) >= 0 && todo.length === 1) {
    // Once: a reload or a link copied from here does not arm the form again.
    window.history.replaceState(null, "", window.location.pathname + window.location.hash);
    if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", function () { arm(todo); });
    else arm(todo);
  }

  tick();
  setInterval(tick, 1000);
})();
