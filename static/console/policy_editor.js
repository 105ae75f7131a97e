// The policy editor: line numbers beside the YAML, problem lines marked, Tab indents, and the
// per-item forms carry the YAML as it is now typed (they post it with their fields).
(function () {
  "use strict";
  var source = document.getElementById("policy-source");
  var gutter = document.getElementById("policy-gutter");
  if (!source || !gutter) {
    return;
  }
  var problemLines = {};
  (source.getAttribute("data-problem-lines") || "").split(" ").forEach(function (line) {
    if (line) {
      problemLines[line] = true;
    }
  });

  function renderGutter() {
    var count = source.value.split("\n").length;
    var fragment = document.createDocumentFragment();
    for (var n = 1; n <= count; n++) {
      var line = document.createElement("span");
      line.textContent = String(n);
      if (problemLines[String(n)]) {
        line.className = "gutter-problem";
        line.title = "problem on this line";
      }
      fragment.appendChild(line);
      fragment.appendChild(document.createTextNode("\n"));
    }
    gutter.replaceChildren(fragment);
    gutter.scrollTop = source.scrollTop;
  }

  source.addEventListener("input", function () {
    // Once edited, the marks may no longer point at the right lines: check again to refresh.
    problemLines = {};
    renderGutter();
  });
  source.addEventListener("scroll", function () {
    gutter.scrollTop = source.scrollTop;
  });
  source.addEventListener("keydown", function (event) {
    if (event.key !== "Tab" || event.shiftKey || event.ctrlKey || event.metaKey || event.altKey) {
      return;
    }
    event.preventDefault();
    var start = source.selectionStart;
    source.setRangeText("  ", start, source.selectionEnd, "end");
    renderGutter();
  });

  // A link to a problem's line puts the caret there.
  document.querySelectorAll(".source-line.has-problem").forEach(function (item) {
    item.addEventListener("click", function () {
      var number = parseInt(item.id.replace("line-", ""), 10);
      var lines = source.value.split("\n");
      var offset = 0;
      for (var i = 0; i < number - 1 && i < lines.length; i++) {
        offset += lines[i].length + 1;
      }
      source.focus();
      source.setSelectionRange(offset, offset + (lines[number - 1] || "").length);
    });
  });

  var note = document.getElementById("policy-note");
  document.querySelectorAll("form.item-form").forEach(function (form) {
    form.addEventListener("submit", function () {
      form.querySelectorAll("input.sync-source").forEach(function (input) {
        input.value = source.value;
      });
      if (note) {
        form.querySelectorAll("input.sync-note").forEach(function (input) {
          input.value = note.value;
        });
      }
    });
  });

  renderGutter();
})();
