// Cell renderers for the dashboard's ag-grid tables (dash-ag-grid looks them up by name here).
var dagcomponentfuncs = (window.dashAgGridComponentFunctions = window.dashAgGridComponentFunctions || {});

// A trace id as a link to its forward page; the cell's value stays the plain id (sort, filter, CSV).
dagcomponentfuncs.TraceLink = function (props) {
  if (!props.value) return null;
  return React.createElement("a", {href: "/forward?trace=" + encodeURIComponent(props.value), className: "mp-mono"}, props.value);
};
