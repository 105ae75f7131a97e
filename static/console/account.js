// The tokens page: copy a new token's value, confirm before revoking (no inline handlers: CSP).
"use strict";
document.addEventListener("click", function (event) {
  var button = event.target.closest("[data-copy]");
  if (!button) return;
  var id = button.getAttribute("data-copy");
  var field = document.getElementById(id);
  var done = function () {
    var note = document.querySelector('[data-copied-for="' + id + '"]');
    if (note) note.hidden = false;
  };
  if (navigator.clipboard && navigator.clipboard.writeText) {
    navigator.clipboard.writeText(field.value).then(done);
  } else {
    field.select();
    document.execCommand("copy");
    done();
  }
});
document.addEventListener("submit", function (event) {
  var message = event.target.getAttribute("data-confirm");
  if (message && !window.confirm(message)) event.preventDefault();
});
