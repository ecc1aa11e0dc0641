"""Look of the dashboard: the page CSS and the base plotly layout. Nothing here queries or lays out."""

_AXIS = {"gridcolor": "#ebf0f8", "linecolor": "#ebf0f8", "zerolinecolor": "#ebf0f8", "automargin": True}

# The look of plotly's "plotly_white", spelled out: validating a full named template costs ~30 ms
# per figure in plotly.py (a view draws four), the empty "none" template ~1 ms.
LAYOUT = {
    "template": "none",
    # Transparent, so that the card behind the chart (light or dark, see CSS) shows through.
    "paper_bgcolor": "rgba(0,0,0,0)",
    "plot_bgcolor": "rgba(0,0,0,0)",
    "font": {"color": "#2a3f5f"},
    "colorway": ["#636efa", "#EF553B", "#00cc96", "#ab63fa", "#FFA15A", "#19d3f3", "#FF6692", "#B6E880"],
    "xaxis": _AXIS,
    "yaxis": _AXIS,
    "margin": {"l": 60, "r": 20, "t": 45, "b": 45},
    "modebar": {"bgcolor": "rgba(128,128,128,0.12)", "color": "#8b949e", "activecolor": "#58a6ff"},  # light and dark
    "height": 340,
}

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0; background: #f6f7f9; color: #1f2328; }
.mp-header { display: flex; align-items: center; gap: 18px; padding: 10px 20px; background: #1f2937; color: #fff; flex-wrap: wrap; }
.mp-header h1 { font-size: 18px; margin: 0; font-weight: 600; }
.mp-nav a { color: #d1d5db; text-decoration: none; margin-right: 14px; font-size: 14px; }
.mp-nav a:hover { color: #fff; }
.mp-live { background: #16a34a; border-radius: 10px; padding: 2px 8px; font-size: 12px; }
.mp-open { margin-left: auto; display: flex; gap: 6px; flex-shrink: 0; }
.mp-open .dash-input-container { width: 320px; }
.mp-open input { width: 100%; font-family: monospace; padding: 4px 6px; }
.mp-filters { display: grid; grid-template-columns: repeat(7, minmax(120px, 1fr)); gap: 10px; padding: 10px 20px; background: #fff; border-bottom: 1px solid #e5e7eb; }
.mp-filters label { font-size: 12px; color: #57606a; }
.mp-page { padding: 12px 20px 40px; }
.mp-page h2 { font-size: 17px; margin: 6px 0 10px; }
.mp-grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(min(520px, 100%), 1fr)); gap: 12px; }
.mp-grid > * { min-width: 0; }  /* a wide table scrolls inside its card, not the page */
.mp-card { background: #fff; border: 1px solid #e5e7eb; border-radius: 6px; padding: 6px; }
.mp-stats { display: flex; gap: 12px; margin-bottom: 12px; flex-wrap: wrap; }
.mp-stat { background: #fff; border: 1px solid #e5e7eb; border-radius: 6px; padding: 8px 14px; min-width: 120px; }
.mp-stat b { display: block; font-size: 20px; }
.mp-stat span { font-size: 12px; color: #57606a; }
.mp-message { padding: 10px 14px; border-radius: 6px; margin: 8px 0; }
.mp-message:empty { display: none; }
.mp-info { background: #eef6ff; border: 1px solid #b6d4fe; }
.mp-error { background: #fff1f0; border: 1px solid #ffa39e; }
.mp-controls { display: flex; gap: 16px; align-items: end; margin-bottom: 10px; flex-wrap: wrap; }
.mp-about { font-size: 12px; color: #57606a; padding: 2px 8px 4px 52px; line-height: 1.35; }
.mp-page .mp-about:first-child { padding-left: 0; }
.mp-controls > div { min-width: 200px; }
table.mp-table { border-collapse: collapse; width: 100%; font-size: 13px; background: #fff; }
table.mp-table th, table.mp-table td { border-bottom: 1px solid #eaecef; padding: 4px 8px; text-align: left; white-space: nowrap; }
table.mp-table th { background: #f3f4f6; }
table.mp-table td.mp-num { text-align: right; font-variant-numeric: tabular-nums; }
.mp-mono { font-family: monospace; }
.mp-filters input { width: 100%; box-sizing: border-box; padding: 6px; border: 1px solid #ccc; border-radius: 4px; }
.mp-controls input:not([type=radio]):not([type=checkbox]) { padding: 6px; border: 1px solid #ccc; border-radius: 4px; width: 140px; }  /* not the spectral page's radio buttons */
.mp-csv { margin: 0 0 6px; padding: 4px 10px; font-size: 13px; cursor: pointer; }
.mp-table-card { margin-bottom: 12px; }
.mp-card { position: relative; }
.mp-chart-csv { position: absolute; left: 8px; bottom: 4px; margin: 0; padding: 1px 6px; font-size: 11px; opacity: 0.7; z-index: 2; }
.mp-table-card .ag-center-cols-viewport { min-height: unset !important; }  /* autoHeight grids: no blank band */
@media (max-width: 1100px) { .mp-filters { grid-template-columns: repeat(4, minmax(120px, 1fr)); } }
@media (prefers-color-scheme: dark) {
  body { background: #0d1117; color: #e6edf3; }
  .mp-filters, .mp-card, .mp-stat { background: #161b22; border-color: #30363d; }
  .mp-filters label, .mp-stat span { color: #8b949e; }
  .mp-info { background: #0c2d6b; border-color: #1f6feb; }
  .mp-error { background: #3d1214; border-color: #f85149; }
  .mp-filters input, .mp-controls input, .mp-open input, .mp-csv { background: #0d1117; color: #e6edf3; border-color: #30363d; }
  a { color: #58a6ff; }
  /* plotly writes text and grid colours inline; the dark theme overrides them here */
  .js-plotly-plot .main-svg text { fill: #c9d1d9 !important; }
  .js-plotly-plot .gridlayer path, .js-plotly-plot .zerolinelayer path { stroke: #30363d !important; }
  .mp-about { color: #8b949e; }
  /* Dash 4's controls (dropdowns, inputs, radio items) draw from these variables; `html:root`
     outranks the `:root` block Dash injects after this sheet */
  html:root {
    --Dash-Stroke-Strong: rgba(201, 209, 217, 0.45); --Dash-Stroke-Weak: #30363d;
    --Dash-Fill-Interactive-Strong: #a371f7; --Dash-Fill-Interactive-Weak: rgba(88, 166, 255, 0.08);
    --Dash-Fill-Inverse-Strong: #0d1117; --Dash-Text-Primary: #e6edf3; --Dash-Text-Strong: #f0f6fc;
    --Dash-Text-Weak: #8b949e; --Dash-Text-Disabled: #6e7681; --Dash-Fill-Primary-Hover: rgba(177, 186, 196, 0.12);
    --Dash-Fill-Primary-Active: rgba(177, 186, 196, 0.2); --Dash-Fill-Disabled: rgba(110, 118, 129, 0.2);
    --Dash-Tooltip-Background-Color: #161b22; --Dash-Tooltip-Border-Color: #30363d;
  }
  .mp-controls input, .mp-filters input { color-scheme: dark; }
  .mp-filters [class*="placeholder"], .mp-controls [class*="placeholder"], input::placeholder { color: #8b949e !important; }
}
"""
