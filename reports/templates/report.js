// Progressive enhancement for the report; everything stays readable without it.
// 1. Tables with class "sortable" get a sort button in each column header
//    (cells with a data-sort attribute sort by that number).
// 2. Printing opens every <details> element, so the manifest is printed too.
(function () {
  "use strict";
  function sortKey(cell) {
    var value = cell.getAttribute("data-sort");
    return value === null ? cell.textContent.trim().toLowerCase() : parseFloat(value);
  }
  function compare(a, b) {
    if (typeof a === "number" && typeof b === "number") {
      if (isNaN(a)) { return isNaN(b) ? 0 : 1; }
      if (isNaN(b)) { return -1; }
      return a - b;
    }
    return a < b ? -1 : (a > b ? 1 : 0);
  }
  function sortTable(table, column, header) {
    var body = table.tBodies[0];
    var ascending = header.getAttribute("aria-sort") !== "ascending";
    var rows = Array.prototype.slice.call(body.rows);
    var keyed = rows.map(function (row, index) {
      return { row: row, key: sortKey(row.cells[column]), index: index };
    });
    keyed.sort(function (x, y) {
      var order = compare(x.key, y.key);
      return (ascending ? order : -order) || x.index - y.index;
    });
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (cell) {
      cell.removeAttribute("aria-sort");
    });
    header.setAttribute("aria-sort", ascending ? "ascending" : "descending");
    keyed.forEach(function (item) { body.appendChild(item.row); });
  }
  Array.prototype.forEach.call(document.querySelectorAll("table.sortable"), function (table) {
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (header, column) {
      var button = document.createElement("button");
      button.type = "button";
      button.className = "sort";
      button.title = "sort by this column";
      while (header.firstChild) { button.appendChild(header.firstChild); }
      header.appendChild(button);
      button.addEventListener("click", function () { sortTable(table, column, header); });
    });
    table.setAttribute("data-sortable", "ready");
  });
  var closed = [];
  window.addEventListener("beforeprint", function () {
    closed = Array.prototype.filter.call(document.querySelectorAll("details"), function (d) {
      return !d.open;
    });
    closed.forEach(function (d) { d.open = true; });
  });
  window.addEventListener("afterprint", function () {
    closed.forEach(function (d) { d.open = false; });
    closed = [];
  });
})();
