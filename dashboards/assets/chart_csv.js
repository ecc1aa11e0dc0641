// "CSV" under a chart: the numbers the chart draws (already aggregated on the server), one row
// per point — series, x, y (and z for heatmaps) — as a file download. Runs in the browser from
// the drawn figure, so the file is exactly what the chart shows. Columns are named after the
// chart's axis titles (and a heatmap's colour-bar title), so the file says what each number is.
window.dash_clientside = Object.assign({}, window.dash_clientside, {
  mp: {
    chartCsv: function (clicks, id) {
      if (!clicks) return window.dash_clientside.no_update;
      var gd = document.querySelector("#" + CSS.escape(id.graph) + " .js-plotly-plot");
      if (!gd || !gd._fullData) return window.dash_clientside.no_update;
      var cell = function (v) {
        var s = v == null ? "" : String(v);
        return /[",\n]/.test(s) ? '"' + s.replace(/"/g, '""') + '"' : s;
      };
      var title = function (axis, fallback) {
        var t = axis && axis.title && axis.title.text;
        return t ? String(t) : fallback;
      };
      var first = gd._fullData.find(function (t) { return t.hoverinfo !== "skip"; }) || {};
      var layout = gd._fullLayout || {};
      var xName = title(layout[(first.xaxis || "x").replace("x", "xaxis")], "x");
      var yName = title(layout[(first.yaxis || "y").replace("y", "yaxis")], "y");
      var heat = gd._fullData.find(function (t) { return t.z; });
      var zName = heat ? title(heat.colorbar, "value") : "";
      var rows = [heat ? ["series", xName, yName, zName] : ["series", xName, yName]];
      // _fullData: the traces as drawn, with typed arrays decoded (gd.data keeps them base64)
      gd._fullData.forEach(function (t, k) {
        if (t.hoverinfo === "skip") return;  // band edges: their values are in the median's tooltip
        var name = t.name || "trace " + k;
        if (t.z) {
          var z = Array.from(t.z, function (r) { return Array.from(r); });
          z.forEach(function (row, i) {
            row.forEach(function (v, j) {
              rows.push([name, t.x ? t.x[j] : j, t.y ? t.y[i] : i, v]);
            });
          });
        } else if (t.x) {
          Array.from(t.x).forEach(function (x, i) {
            var row = [name, x, t.y ? t.y[i] : ""];
            rows.push(heat ? row.concat([""]) : row);
          });
        }
      });
      var text = rows.map(function (r) { return r.map(cell).join(","); }).join("\n") + "\n";
      return {content: text, filename: id.graph + ".csv", base64: false};
    },
  },
});
