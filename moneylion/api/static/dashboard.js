// The dashboard's actions that change data or run work, through the JSON API: a file's
// correction (retract, restore, release: a dialog asks why, then POST /v1/files/{id}/<action>)
// and the upload form's "Check first" (POST /v1/checks with the chosen file, then its report).
// Same-origin fetch(): the session cookie goes with the browser's Origin header, which the
// access rules ask of a session's unsafe request. Text from answers is set as text, never as
// markup; the page's policy allows no inline script or style, so nothing here uses either.
"use strict";
(function () {
  // --- small helpers --------------------------------------------------------------------------

  function node(tag, attributes, children) {
    const element = document.createElement(tag);
    for (const [name, value] of Object.entries(attributes || {})) {
      element.setAttribute(name, value);
    }
    for (const child of children || []) {
      element.append(child instanceof Node ? child : String(child));
    }
    return element;
  }

  function count(value) {
    return Number(value).toLocaleString("en-US");
  }

  function plural(n, one, many) {
    return `${count(n)} ${n === 1 ? one : many}`;
  }

  // POST and read the JSON answer: {ok, status, body} or {ok: false, message} for the user.
  async function post(url, init) {
    let response;
    try {
      response = await fetch(url, {
        method: "POST",
        credentials: "same-origin",
        headers: { accept: "application/json", ...(init.headers || {}) },
        body: init.body,
      });
    } catch (error) {
      return { ok: false, message: `The daemon did not answer (${error.message}).` };
    }
    let body = null;
    try {
      body = await response.json();
    } catch (_) {
      body = null;
    }
    if (response.ok) {
      return { ok: true, status: response.status, body: body };
    }
    if (response.status === 401) {
      return { ok: false, message: "Your session has ended: log in again, then retry." };
    }
    const detail = body && (body.detail || body.title);
    return { ok: false, message: `${response.status}: ${detail || response.statusText}` };
  }

  // --- corrections on a file's page -----------------------------------------------------------

  const DONE = { retract: "Retracted", restore: "Restored", release: "Released" };

  function correctionResult(answer) {
    const others = answer.files_changed
      ? `, ${plural(answer.files_changed, "other file", "other files")} decided again`
      : "";
    return node("p", { "data-result": answer.action }, [
      node("strong", {}, [`${DONE[answer.action] || answer.action} file #${answer.file_id}`]),
      ` (change #${answer.change_id}): ${plural(answer.rows_out, "row", "rows")} out, `,
      `${plural(answer.rows_in, "row", "rows")} in${others}, `,
      `in ${answer.seconds.toFixed(3)} s. Status now: `,
      node("span", { "data-result-status": "" }, [answer.status]),
      ".",
    ]);
  }

  // The page again from the server (its outcome, the corrections it offers now, its history),
  // keeping the result shown.
  async function refreshFilePage(result) {
    const response = await fetch(window.location.href, { credentials: "same-origin" });
    if (!response.ok) {
      return;
    }
    const fresh = new DOMParser().parseFromString(await response.text(), "text/html");
    const main = fresh.querySelector("main");
    const placeholder = main && main.querySelector("#correction-result");
    if (!placeholder) {
      return;
    }
    placeholder.replaceWith(result);
    document.querySelector("main").replaceChildren(...main.childNodes);
    result.focus();
  }

  async function submitCorrection(form) {
    const error = form.querySelector("[data-correction-error]");
    const submit = form.querySelector("button[type=submit]");
    const reason = form.elements.reason.value.trim();
    if (form.elements.reason.required && !reason) {
      error.textContent = "Say why: the reason is kept in the ledger.";
      error.hidden = false;
      return;
    }
    error.hidden = true;
    submit.disabled = true;
    const answer = await post(form.dataset.url, {
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ reason: reason || null }),
    });
    submit.disabled = false;
    if (!answer.ok) {
      error.textContent = answer.message;
      error.hidden = false;
      return;
    }
    form.closest("dialog").close();
    const result = document.getElementById("correction-result");
    result.replaceChildren(correctionResult(answer.body));
    await refreshFilePage(result);
  }

  // --- "Check first" on the upload form --------------------------------------------------------

  const OUTCOMES = {
    would_load: "Would load",
    would_hold: "Would be held: too many of its rows would be refused, nothing of it would load until it is released",
    would_fail: "Would be refused whole",
    seen_before: "Seen before: these bytes are in the ledger already, nothing would change",
  };

  function table(caption, headings, rows) {
    return node("div", { class: "scroll" }, [
      node("table", {}, [
        node("caption", {}, [caption]),
        node("thead", {}, [
          node("tr", {}, headings.map(([text, css]) => node("th", { scope: "col", class: css || "" }, [text]))),
        ]),
        node("tbody", {}, rows),
      ]),
    ]);
  }

  function cell(text, css) {
    return node("td", css ? { class: css } : {}, [text]);
  }

  function checkReport(report) {
    const parts = [];
    parts.push(
      node("h3", {}, [`Check of ${report.name}`]),
      node("p", { "data-check-outcome": report.outcome }, [
        node("strong", {}, [OUTCOMES[report.outcome] || report.outcome]),
        report.kind ? ` (${report.kind})` : "",
        ".",
      ]),
    );
    if (report.outcome === "seen_before" && report.file_id) {
      parts.push(
        node("p", {}, [
          node("a", { href: `/files/${report.file_id}` }, [`File #${report.file_id}`]),
          " has these bytes.",
        ]),
      );
    }
    if (report.error_reason || report.error) {
      parts.push(
        node("p", { class: "bad", "data-check-error": report.error_reason || "" }, [
          node("span", { class: "reason" }, [report.error_reason || "unknown"]),
          report.error ? `: ${report.error}` : "",
        ]),
      );
    }
    const rows = report.rows;
    parts.push(
      node("dl", { class: "figures" }, [
        node("dt", {}, ["Rows"]),
        node("dd", { "data-check-rows": "total" }, [count(rows.total)]),
        node("dt", {}, ["Would load"]),
        node("dd", { "data-check-rows": "loaded" }, [count(rows.loaded)]),
        node("dt", {}, ["Duplicate"]),
        node("dd", { "data-check-rows": "duplicate" }, [count(rows.duplicate)]),
        node("dt", {}, ["Rejected"]),
        node("dd", { "data-check-rows": "rejected" }, [count(rows.rejected)]),
        node("dt", {}, ["Users touched"]),
        node("dd", { "data-check-effect": "users" }, [count(report.effect.users_touched)]),
        node("dt", {}, ["Days touched"]),
        node("dd", { "data-check-effect": "days" }, [count(report.effect.days_touched)]),
      ]),
    );
    if (report.rejects.length) {
      parts.push(
        table(
          "Rejected rows by reason (the first lines of each)",
          [["Reason"], ["Rows", "num"], ["First lines"]],
          report.rejects.map((group) =>
            node("tr", { "data-check-reject": group.reason }, [
              cell(group.reason),
              cell(count(group.count), "num"),
              node(
                "td",
                {},
                group.first.map((line) => node("div", {}, [`line ${line.line}: ${line.message}`])),
              ),
            ]),
          ),
        ),
      );
    }
    const effect = report.effect;
    if (effect.days.length) {
      parts.push(
        node("details", {}, [
          node("summary", {}, [`Days and types touched (${count(effect.days_touched)}; the first ${effect.days.length})`]),
          table(
            "Totals before and after",
            [["Day"], ["Type"], ["Before", "num"], ["After", "num"]],
            effect.days.map((day) =>
              node("tr", {}, [
                cell(day.transaction_date),
                cell(day.transaction_type),
                cell(`${count(day.before.tx_count)} · ${day.before.total_amount}`, "num"),
                cell(`${count(day.after.tx_count)} · ${day.after.total_amount}`, "num"),
              ]),
            ),
          ),
        ]),
      );
    }
    if (effect.users.length) {
      const profile = (state) => [state.country, state.signup_date].filter(Boolean).join(", ") || "no profile";
      parts.push(
        node("details", {}, [
          node("summary", {}, [`Users touched (${count(effect.users_touched)}; the first ${effect.users.length})`]),
          table(
            "Each user before and after: transactions · total (profile)",
            [["User"], ["Before"], ["After"]],
            effect.users.map((user) =>
              node("tr", {}, [
                cell(user.user_id),
                cell(`${count(user.before.tx_count)} · ${user.before.total_amount} (${profile(user.before)})`),
                cell(`${count(user.after.tx_count)} · ${user.after.total_amount} (${profile(user.after)})`),
              ]),
            ),
          ),
        ]),
      );
    }
    const before = effect.top_users_before;
    const after = effect.top_users_after;
    if (JSON.stringify(before) !== JSON.stringify(after)) {
      const ranks = Math.max(before.length, after.length);
      const show = (ranked) => (ranked ? `${ranked.user_id} (${count(ranked.tx_count)})` : "—");
      parts.push(
        node("details", {}, [
          node("summary", {}, ["The top users would change"]),
          table(
            "Top users before and after: user (transactions)",
            [["Rank", "num"], ["Before"], ["After"]],
            Array.from({ length: ranks }, (_, i) =>
              node("tr", {}, [cell(i + 1, "num"), cell(show(before[i])), cell(show(after[i]))]),
            ),
          ),
        ]),
      );
    }
    parts.push(node("p", { class: "hint" }, [`Checked in ${report.seconds.toFixed(3)} s; nothing was kept.`]));
    return parts;
  }

  async function checkFirst(button) {
    const input = document.getElementById("upload-file");
    const result = document.getElementById("check-result");
    if (!input.files.length) {
      input.reportValidity();
      return;
    }
    const file = input.files[0];
    button.disabled = true;
    result.replaceChildren(node("p", {}, [`Checking ${file.name}…`]));
    const answer = await post(`${button.dataset.url}?name=${encodeURIComponent(file.name)}`, {
      headers: { "content-type": "text/csv" },
      body: file,
    });
    button.disabled = false;
    if (!answer.ok) {
      result.replaceChildren(node("p", { class: "bad", role: "alert" }, [answer.message]));
      return;
    }
    result.replaceChildren(...checkReport(answer.body));
  }

  // --- wiring: delegated, so that parts swapped in (htmx, a refreshed file page) work too ------

  document.addEventListener("click", function (event) {
    const target = event.target instanceof Element ? event.target : null;
    const opens = target && target.closest("[data-opens]");
    if (opens) {
      const dialog = document.getElementById(opens.dataset.opens);
      dialog.querySelector("[data-correction-error]").hidden = true;
      dialog.showModal();
      return;
    }
    const closes = target && target.closest("[data-closes]");
    if (closes) {
      document.getElementById(closes.dataset.closes).close();
      return;
    }
    const check = target && target.closest("#check-first");
    if (check) {
      checkFirst(check);
    }
  });

  document.addEventListener("submit", function (event) {
    const form = event.target instanceof HTMLFormElement ? event.target : null;
    if (form && form.dataset.correction) {
      event.preventDefault();
      submitCorrection(form);
    }
  });

  // A new file chosen: the report of the previous one no longer applies.
  document.addEventListener("change", function (event) {
    if (event.target instanceof Element && event.target.id === "upload-file") {
      const result = document.getElementById("check-result");
      if (result) {
        result.replaceChildren();
      }
    }
  });
})();
