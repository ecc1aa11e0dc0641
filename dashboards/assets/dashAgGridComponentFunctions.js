// Cell renderers for the dashboard's ag-grid tables (dash-ag-grid looks them up by name here).
var dagcomponentfuncs = (window.dashAgGridComponentFunctions = window.dashAgGridComponentFunctions || {});

// A trace id as a link to its forward page, keeping the page's filters in the URL; the cell's
// value stays the plain id (sort, filter, CSV).
dagcomponentfuncs.TraceLink = function (props) {
  if (!props.value) return null;
  var query = new URLSearchParams(window.location.search);
  query.set("trace", props.value);
  return React.createElement("a", {href: "/forward?" + query.toString(), className: "mp-mono"}, props.value);
};
