/* nudgeflow tracker: page views, product views, cart events and page_leave with dwell time.
 *
 *   <script src="https://COLLECTOR/tracker.js" data-write-key="KEY" data-page-type="product"
 *           data-product-id="p1" data-user-id="42" async></script>
 *   nudgeflow.addToCart("p1", 1, 19.9); nudgeflow.identify("42", {opt_in: ["email"]});
 *
 * Events are canonical (EVENTS.md §1) and go to COLLECTOR/v1/events?writeKey=KEY as
 * text/plain JSON arrays (a "simple" CORS request: no preflight, and what sendBeacon sends).
 * Calls leave one at a time, in order; a call the collector did not take (network error,
 * 429, 5xx) is sent again, same event ids, after a back-off: the flow's dedup by event_id
 * drops the copies. Dwell time counts only the time the page was visible; page_leave is sent
 * at the first `visibilitychange` to hidden or `pagehide`, with sendBeacon, which outlives
 * the page. A page shown again (tab back, back-forward cache) starts a new page view.
 */
(function (window, document) {
  "use strict";
  if (window.nudgeflow && window.nudgeflow._loaded) return;

  var script = document.currentScript;
  var data = (script && script.dataset) || {};
  var base = data.endpoint || (script ? new URL(script.src).origin : "");
  var config = { writeKey: data.writeKey || "", endpoint: base };

  function uuid() {
    if (window.crypto && window.crypto.randomUUID) return window.crypto.randomUUID();
    var hex = "";
    for (var i = 0; i < 32; i++) hex += Math.floor(Math.random() * 16).toString(16);
    return hex.slice(0, 8) + "-" + hex.slice(8, 12) + "-" + hex.slice(12, 16) + "-" +
      hex.slice(16, 20) + "-" + hex.slice(20);
  }

  function stored(storage, name) {
    try {
      var value = storage.getItem(name);
      if (!value) { value = uuid(); storage.setItem(name, value); }
      return value;
    } catch (e) { return uuid(); } // storage disabled: one id for this page
  }

  var userId = data.userId || stored(window.localStorage, "nudgeflow_anonymous_id");
  var sessionId = stored(window.sessionStorage, "nudgeflow_session_id");

  // --- sending: one call in flight, in order, retried until taken ---------------------------
  var queue = [];      // {path, body} waiting, in order
  var current = null;  // the entries of the call in flight
  var backoffMs = 500;
  var timer = null;

  function url(path) {
    return config.endpoint + path + "?writeKey=" + encodeURIComponent(config.writeKey);
  }

  function schedule(delayMs) {
    if (timer === null) timer = window.setTimeout(function () { timer = null; flush(); }, delayMs);
  }

  function takeCall() {
    // Consecutive events travel together; an identify call goes alone, in its place.
    var count = 1;
    if (queue[0].path === "/v1/events") {
      while (count < queue.length && count < 100 && queue[count].path === "/v1/events") count++;
    }
    var entries = queue.splice(0, count);
    var body = entries[0].path === "/v1/events"
      ? entries.map(function (e) { return e.body; }) : entries[0].body;
    return { path: entries[0].path, body: body, entries: entries };
  }

  function flush() {
    if (current !== null || queue.length === 0) return;
    var call = takeCall();
    current = call.entries;
    window.fetch(url(call.path), {
      method: "POST", body: JSON.stringify(call.body), keepalive: true,
      headers: { "content-type": "text/plain" }, mode: "cors", credentials: "omit"
    }).then(function (response) {
      if (response.status === 429 || response.status >= 500) return retry(response);
      current = null; // taken, or refused for good (another 4xx would be the same answer)
      backoffMs = 500;
      flush();
    }, function () { retry(null); });
  }

  function retry(response) {
    queue = current.concat(queue); // first again, same event ids
    current = null;
    var after = response && Number(response.headers.get("retry-after"));
    schedule(after > 0 ? after * 1000 : backoffMs);
    backoffMs = Math.min(backoffMs * 2, 30000);
  }

  function enqueue(path, body) {
    queue.push({ path: path, body: body });
    schedule(0);
  }

  function beaconAll() {
    // The page is going away: hand everything still waiting to the browser.
    if (queue.length === 0) return;
    var events = queue.filter(function (c) { return c.path === "/v1/events"; })
      .map(function (c) { return c.body; });
    var others = queue.filter(function (c) { return c.path !== "/v1/events"; });
    if (events.length && navigator.sendBeacon &&
        navigator.sendBeacon(url("/v1/events"), new Blob([JSON.stringify(events)],
                                                          { type: "text/plain" }))) {
      queue = others; // the browser sends them, even after the page is gone
    }
    flush(); // keepalive fetch: the last chance for what is left
  }

  // --- events ------------------------------------------------------------------------------
  function event(type, fields) {
    var body = { event_id: uuid(), user_id: userId, type: type, ts: Date.now(),
                 session_id: sessionId, url: window.location.href };
    for (var name in fields) {
      if (Object.prototype.hasOwnProperty.call(fields, name) && fields[name] !== undefined) {
        body[name] = fields[name];
      }
    }
    return body;
  }

  function track(type, fields) { enqueue("/v1/events", event(type, fields || {})); }

  // --- page views and dwell ------------------------------------------------------------------
  var view = null; // {pageType, productId, visibleMs, visibleSince, left}

  function startView(pageType, productId) {
    view = { pageType: pageType || "other", productId: productId, visibleMs: 0,
             visibleSince: document.visibilityState === "visible" ? Date.now() : null,
             left: false };
    track("page_view", { page_type: view.pageType, product_id: productId });
  }

  function leave() {
    if (!view || view.left) return;
    if (view.visibleSince !== null) view.visibleMs += Date.now() - view.visibleSince;
    view.visibleSince = null;
    view.left = true;
    track("page_leave", { page_type: view.pageType, product_id: view.productId,
                          dwell_ms: Math.max(0, Math.round(view.visibleMs)) });
    beaconAll();
  }

  document.addEventListener("visibilitychange", function () {
    if (document.visibilityState === "hidden") leave();
    else if (view && view.left) startView(view.pageType, view.productId);
    else if (view && view.visibleSince === null) view.visibleSince = Date.now();
  });
  window.addEventListener("pagehide", leave);
  window.addEventListener("pageshow", function (e) {
    if (e.persisted && view && view.left) startView(view.pageType, view.productId);
  });

  var api = {
    _loaded: true,
    configure: function (options) {
      if (options.writeKey) config.writeKey = options.writeKey;
      if (options.endpoint) config.endpoint = options.endpoint;
    },
    identify: function (id, traits) {
      userId = String(id);
      enqueue("/v1/identify", { type: "identify", messageId: uuid(), userId: userId,
                                traits: traits || {}, timestamp: new Date().toISOString() });
    },
    page: function (pageType, productId) { leave(); startView(pageType, productId); },
    productView: function (productId) { api.page("product", productId); },
    addToCart: function (productId, quantity, price) {
      track("add_to_cart", { product_id: productId, quantity: quantity || 1, price: price });
    },
    removeFromCart: function (productId, quantity) {
      track("remove_from_cart", { product_id: productId, quantity: quantity || 1 });
    },
    checkoutStarted: function () { track("checkout_started", {}); },
    purchase: function (orderId, value) {
      track("purchase", { order_id: orderId, value: value });
    },
    userId: function () { return userId; },
    pending: function () { return queue.length + (current ? current.length : 0); }
  };
  window.nudgeflow = api;

  if (data.userId) userId = data.userId;
  if (data.autoPage !== "false") startView(data.pageType, data.productId);
})(window, document);
