/* Usage dashboard: reads the usage API (usage/api.py; session auth, GET only, so no CSRF header) and
 * draws the totals, four daily charts (requests, errors, latency, tokens), the grouped table and a
 * daily table.
 *
 *   GET <data-api-url>?group_by=<dims>&limit=1000&<filters>  ->  {count, next, totals, results: [...]}
 *
 * Three reads: group_by=day (exact daily sums), group_by=<table dimension>, and the finest buckets
 * (day,user,server,tool), because the API gives latency_p95_ms only per single bucket: the p95 shown
 * for a day or a group is the highest p95 among its buckets (an upper bound, said so on the page).
 *
 * Every figure is split by outcome (the API's `outcomes`; names and labels come from the page, which
 * has them from usage.models.Outcome). Each row of the grouped table links to the same page filtered
 * to that row (a plain link: the filters live in the URL, so the back button undoes it). An API
 * error shows the API's own message; only server and network failures suggest trying again.
 */
(function () {
  "use strict";

  var root = document.getElementById("usage-dashboard");
  if (!root) return;

  var MAX_PAGES = 20;
  var KEYS = {user: "user_id", server: "server_id", tool: "tool"};
  var LABELS = {user: ["username", "user_id"], server: ["server_name", "server_id"], tool: ["tool"]};
  var status = document.getElementById("usage-status");
  var charts = {};
  var outcomesData = document.getElementById("usage-outcomes-data");
  var OUTCOMES = outcomesData ? JSON.parse(outcomesData.textContent) : [];
  var NOT_OK = OUTCOMES.filter(function (o) { return o.value !== "ok"; });
  // Filtering to a row also regroups the table by what is most useful to see next.
  var NEXT_DIMENSION = {user: "tool", server: "tool", tool: document.getElementById("id_user") ? "user" : "server"};
  var FILTER_SELECT = {user: "id_user", server: "id_server"};

  function num(value) {
    var n = Number(value);
    return value !== null && value !== undefined && isFinite(n) ? n : 0;
  }

  function fmt(n) {
    return Number(n).toLocaleString("en-GB");
  }

  function ms(value) {
    return value === null || value === undefined ? "—" : fmt(Math.round(num(value))) + " ms";
  }

  function maxOf(a, b) {
    if (a === null || a === undefined) return b === undefined ? null : b;
    if (b === null || b === undefined) return a;
    return Math.max(a, b);
  }

  function apiUrl(groupBy) {
    var query = root.getAttribute("data-query");
    return root.getAttribute("data-api-url") + "?group_by=" + encodeURIComponent(groupBy) + "&limit=1000" +
      (query ? "&" + query : "");
  }

  /* The API's JSON error as one sentence: {"detail": "…"} or {"<field>": ["…"]} (DRF). */
  function apiMessage(body) {
    if (!body || typeof body !== "object") return "";
    if (typeof body.detail === "string") return body.detail;
    return Object.keys(body).map(function (field) {
      var value = body[field];
      var text = Array.isArray(value) ? value.join(" ") : String(value);
      return field === "non_field_errors" ? text : field + ": " + text;
    }).join("; ");
  }

  function getJson(url) {
    return fetch(url, {credentials: "same-origin", headers: {"Accept": "application/json"}}).then(function (r) {
      if (r.ok) return r.json();
      return r.json().catch(function () { return null; }).then(function (body) {
        var error = new Error("HTTP " + r.status);
        error.status = r.status;
        error.detail = apiMessage(body);
        throw error;
      });
    });
  }

  function failureText(error) {
    if (error.status && error.status < 500 && error.detail) {
      return "Usage data could not be loaded: " + error.detail;
    }
    var what = error.status ? "HTTP " + error.status : "the server could not be reached";
    return "Usage data could not be loaded (" + what + "). Try again in a moment.";
  }

  /* Every page of one listing: {totals, results}. */
  function getAll(url) {
    return getJson(url).then(function (first) {
      var results = (first.results || []).slice();
      function more(next, pages) {
        if (!next || pages >= MAX_PAGES) return Promise.resolve({totals: first.totals || {}, results: results});
        return getJson(next).then(function (page) {
          results = results.concat(page.results || []);
          return more(page.next, pages + 1);
        });
      }
      return more(first.next, 1);
    });
  }

  function days() {
    var out = [];
    var start = new Date(root.getAttribute("data-start") + "T00:00:00Z");
    var end = new Date(root.getAttribute("data-end") + "T00:00:00Z");
    for (var d = start; d <= end && out.length < 800; d = new Date(d.getTime() + 86400000)) {
      out.push(d.toISOString().slice(0, 10));
    }
    return out;
  }

  function draw(id, labels, datasets, type) {
    var canvas = document.getElementById(id);
    if (!canvas || !window.Chart) return;
    if (charts[id]) charts[id].destroy();
    charts[id] = new window.Chart(canvas, {
      type: type,
      data: {labels: labels, datasets: datasets.map(function (set) {
        return {label: set.label, data: set.data, backgroundColor: set.colour, borderColor: set.colour,
          borderWidth: type === "line" ? 2 : 0, pointRadius: type === "line" ? 2 : 0, spanGaps: true,
          borderDash: set.dashed ? [5, 4] : undefined, stack: set.stack};
      })},
      options: {responsive: true, maintainAspectRatio: false, animation: false,
        plugins: {legend: {display: datasets.length > 1, position: "bottom"}},
        scales: {x: {stacked: type === "bar", ticks: {maxTicksLimit: 8, autoSkip: true}},
          y: {stacked: type === "bar", beginAtZero: true, ticks: {precision: 0}}}}
    });
  }

  function cell(tr, text, className, label) {
    var td = document.createElement("td");
    td.textContent = text;
    if (className) td.className = className;
    if (label) td.setAttribute("data-label", label);
    tr.appendChild(td);
    return td;
  }

  function emptyRow(body, columns) {
    var tr = document.createElement("tr");
    cell(tr, "No usage in this period.", "muted").colSpan = columns;
    body.appendChild(tr);
  }

  function setTotal(key, text) {
    var el = root.querySelector('[data-total="' + key + '"]');
    if (el) el.textContent = text;
  }

  /* Highest bucket p95 per day and per group key. */
  function p95Index(buckets) {
    var index = {day: {}, user: {}, server: {}, tool: {}, all: null};
    buckets.forEach(function (row) {
      var p95 = row.latency_p95_ms;
      if (p95 === null || p95 === undefined) return;
      index.day[row.day] = maxOf(index.day[row.day], p95);
      Object.keys(KEYS).forEach(function (dim) {
        var key = String(row[KEYS[dim]]);
        index[dim][key] = maxOf(index[dim][key], p95);
      });
      index.all = maxOf(index.all, p95);
    });
    return index;
  }

  function showDaily(daily, p95) {
    var byDay = {};
    daily.results.forEach(function (row) { byDay[String(row.day).slice(0, 10)] = row; });
    var labels = days();
    var s = {requests: [], p95: [], avg: [], tokensIn: [], tokensOut: [], outcomes: {}};
    NOT_OK.forEach(function (o) { s.outcomes[o.value] = []; });
    var body = document.querySelector("#usage-daily tbody");
    body.replaceChildren();
    labels.forEach(function (day) {
      var row = byDay[day];
      var dayP95 = maxOf(row ? row.latency_p95_ms : null, p95.day[day]);
      s.requests.push(row ? num(row.requests) : 0);
      NOT_OK.forEach(function (o) { s.outcomes[o.value].push(row ? num((row.outcomes || {})[o.value]) : 0); });
      s.p95.push(dayP95);
      s.avg.push(row ? row.latency_avg_ms : null);
      s.tokensIn.push(row ? num(row.tokens_in) : 0);
      s.tokensOut.push(row ? num(row.tokens_out) : 0);
      if (row) {
        var tr = document.createElement("tr");
        cell(tr, day, "", "Day");
        cell(tr, fmt(num(row.requests)), "num", "Requests");
        outcomeCells(tr, row);
        cell(tr, ms(dayP95), "num", "p95 latency");
        cell(tr, fmt(num(row.tokens_in) + num(row.tokens_out)), "num", "Tokens");
        body.appendChild(tr);
      }
    });
    if (!body.children.length) emptyRow(body, 4 + OUTCOMES.length);
    var short = labels.map(function (d) { return d.slice(5); });
    draw("chart-requests", short, [{label: "Requests", data: s.requests, colour: "#2352c9"}], "bar");
    draw("chart-errors", short, NOT_OK.map(function (o) {
      return {label: o.label, data: s.outcomes[o.value], colour: o.colour, stack: "o"};
    }), "bar");
    draw("chart-latency", short, [{label: "p95 (highest bucket)", data: s.p95, colour: "#c77700"},
      {label: "Average", data: s.avg, colour: "#5b6473", dashed: true}], "line");
    draw("chart-tokens", short, [{label: "Tokens in", data: s.tokensIn, colour: "#0f766e", stack: "t"},
      {label: "Tokens out", data: s.tokensOut, colour: "#5eead4", stack: "t"}], "bar");

    var totals = daily.totals || {};
    setTotal("requests", fmt(num(totals.requests)));
    setTotal("errors", fmt(num(totals.errors)) + (num(totals.requests) ?
      " (" + (100 * num(totals.errors) / num(totals.requests)).toFixed(1) + " %)" : ""));
    setTotal("p95", ms(maxOf(totals.latency_p95_ms, p95.all)));
    setTotal("tokens", fmt(num(totals.tokens_in) + num(totals.tokens_out)));
    OUTCOMES.forEach(function (o) { setTotal("outcome-" + o.value, fmt(num((totals.outcomes || {})[o.value]))); });
    return num(totals.requests);
  }

  function label(row, dim) {
    var names = LABELS[dim];
    for (var i = 0; i < names.length; i++) {
      if (row[names[i]] !== null && row[names[i]] !== undefined && row[names[i]] !== "") return String(row[names[i]]);
    }
    return dim === "tool" ? "(other methods)" : "—";
  }

  function outcomeCells(tr, row) {
    var outcomes = row.outcomes || {};
    OUTCOMES.forEach(function (o) { cell(tr, fmt(num(outcomes[o.value])), "num", o.label); });
  }

  /* The page's own URL filtered to one row, or null when the row's value cannot be a filter (a
   * deleted server, a user no longer in the list, the methods that are not tool calls). */
  function drillUrl(row, dim) {
    var value = row[KEYS[dim]];
    if (value === null || value === undefined || value === "") return null;
    value = String(value);
    var select = FILTER_SELECT[dim] && document.getElementById(FILTER_SELECT[dim]);
    if (FILTER_SELECT[dim] && !(select && Array.prototype.some.call(select.options, function (option) {
      return option.value === value;
    }))) return null;
    var params = new URLSearchParams(window.location.search);
    params.set(dim, value);
    params.set("group_by", NEXT_DIMENSION[dim]);
    return "?" + params.toString();
  }

  function showGrouped(grouped, dim, p95) {
    var body = document.querySelector("#usage-table tbody");
    var heading = root.getAttribute("data-group-label");
    body.replaceChildren();
    var rows = grouped.results.slice().sort(function (a, b) { return num(b.requests) - num(a.requests); });
    rows.forEach(function (row) {
      var tr = document.createElement("tr");
      var requests = num(row.requests);
      var errors = num(row.errors);
      var first = cell(tr, "", "primary", heading);
      var url = drillUrl(row, dim);
      if (url) {
        var link = document.createElement("a");
        link.href = url;
        link.textContent = label(row, dim);
        link.setAttribute("aria-label", "Filter usage to " + heading.toLowerCase() + " " + label(row, dim));
        first.appendChild(link);
      } else {
        first.textContent = label(row, dim);
      }
      cell(tr, fmt(requests), "num", "Requests");
      outcomeCells(tr, row);
      cell(tr, requests ? (100 * errors / requests).toFixed(1) + " %" : "—", "num", "Error rate");
      cell(tr, ms(maxOf(row.latency_p95_ms, p95[dim][String(row[KEYS[dim]])])), "num", "p95 latency");
      cell(tr, fmt(num(row.tokens_in)), "num", "Tokens in");
      cell(tr, fmt(num(row.tokens_out)), "num", "Tokens out");
      body.appendChild(tr);
    });
    if (!rows.length) emptyRow(body, 6 + OUTCOMES.length);
  }

  function load() {
    var dim = root.getAttribute("data-group-by");
    Promise.all([getAll(apiUrl("day")), getAll(apiUrl(dim)), getAll(apiUrl("day,user,server,tool"))])
      .then(function (answers) {
        var p95 = p95Index(answers[2].results);
        var requests = showDaily(answers[0], p95);
        showGrouped(answers[1], dim, p95);
        root.setAttribute("data-loaded", "true");
        status.textContent = requests ? "" : "No tool call in this period yet.";
      })
      .catch(function (error) {
        root.setAttribute("data-loaded", "error");
        status.textContent = failureText(error);
        status.className = "status-line error";
      });
  }

  load();
})();
