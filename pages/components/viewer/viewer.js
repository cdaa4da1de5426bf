// Tessera's deep-zoom viewer: OpenSeadragon panels (1-4) with the H&E from the tile endpoint and a
// heatmap (domain, high-resolution or cell) overlay image aligned on the slide's tile grid. Speaks Streamlit's component
// protocol by postMessage (no build step). Re-rendering with the same slides only swaps overlays
// and opacity: the viewers, their zoom and their loaded tiles are kept.
(function () {
  "use strict";
  const grid = document.getElementById("grid");
  const state = { layout: null, panels: [], leader: null, clicks: 0, args: null, overlayLoads: 0, renders: 0 };
  window.tessera = state;   // for the browser test and the benchmark

  function send(type, data) {
    window.parent.postMessage(Object.assign({ isStreamlitMessage: true, type: type }, data), "*");
  }
  function setHeight() { send("streamlit:setFrameHeight", { height: document.body.scrollHeight + 4 }); }

  function tileBase(args) {
    if (args.tile_url) return args.tile_url.replace(/\/$/, "");
    return window.location.protocol + "//" + window.location.hostname + ":" + args.tile_port;
  }

  function legendHtml(p) {
    if (p.legend && p.legend.categories) {
      return '<div class="chips">' + p.legend.categories.map(function (c) {
        const color = /^#[0-9a-fA-F]{6}$/.test(c.color) ? c.color : "#999999";
        return '<span class="chip"><span class="sw" style="background:' + color + '"></span>' + escapeHtml(c.label) + "</span>";
      }).join("") + "</div>";
    }
    if (!p.legend) return "";
    const hex = /^#[0-9a-fA-F]{6}$/;
    const stops = p.legend.stops.filter(function (c) { return hex.test(c); })
      .map(function (c, i, all) { return c + " " + Math.round(100 * i / Math.max(all.length - 1, 1)) + "%"; });
    return '<div class="legend"><span>' + escapeHtml(p.legend.min) + '</span><div class="bar" style="background:linear-gradient(90deg,' +
      stops.join(",") + ')"></div><span>' + escapeHtml(p.legend.max) + "</span></div>";
  }

  function escapeHtml(s) {
    return String(s).replace(/[&<>"']/g, function (c) { return { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]; });
  }

  function build(args) {
    state.panels.forEach(function (p) { p.viewer.destroy(); });
    state.panels = [];
    state.leader = null;
    grid.innerHTML = "";
    const n = args.panels.length;
    grid.style.gridTemplateColumns = "repeat(" + Math.min(n, args.columns || n) + ", minmax(0, 1fr))";
    const base = tileBase(args);
    args.panels.forEach(function (p, i) {
      const div = document.createElement("div");
      div.className = "panel";
      div.innerHTML = '<div class="title"></div><div class="osd" id="osd' + i + '" style="height:' +
        Math.max(100, Math.min(2000, Number(args.height) || 560)) + 'px"></div><div class="leg"></div><div class="caption"></div>';
      grid.appendChild(div);
      const viewer = OpenSeadragon({
        element: div.querySelector(".osd"), prefixUrl: "vendor/images/",
        // the Deep Zoom descriptor inline (saves a round trip); tiles from the endpoint
        tileSources: { Image: { xmlns: "http://schemas.microsoft.com/deepzoom/2008", Url: base + "/dzi/" + p.token + "_files/",
          Format: p.dzi.format, Overlap: String(p.dzi.overlap), TileSize: String(p.dzi.tile_size),
          Size: { Width: String(p.width), Height: String(p.height) } } },
        showNavigator: i === 0 || !args.sync, navigatorPosition: "BOTTOM_RIGHT", navigatorSizeRatio: 0.18,
        showRotationControl: false, showFullPageControl: false, animationTime: 0.4, blendTime: 0,
        imageSmoothingEnabled: false, maxZoomPixelRatio: 2, visibilityRatio: 0.5, immediateRender: false,
        crossOriginPolicy: "Anonymous", gestureSettingsMouse: { clickToZoom: false },
      });
      const panel = { viewer: viewer, div: div, overlay: null, overlayUrl: null, marker: null, spec: p };
      state.panels.push(panel);
      viewer.addHandler("open", function () { state.builtAt = state.builtAt || performance.now(); update(state.args || args); });
      viewer.addHandler("canvas-click", function (e) {
        if (!e.quick) return;
        const item = viewer.world.getItemAt(0);
        if (!item) return;
        const pt = item.viewportToImageCoordinates(viewer.viewport.pointFromPixel(e.position));
        state.clicks += 1;
        send("streamlit:setComponentValue", { value: { panel: i, x: Math.round(pt.x), y: Math.round(pt.y), n: state.clicks }, dataType: "json" });
      });
      // synced views follow the panel the user is working in (the leader); followers never push back
      ["canvas-enter", "canvas-press", "canvas-scroll", "canvas-drag"].forEach(function (ev) {
        viewer.addHandler(ev, function () { state.leader = viewer; });
      });
      viewer.addHandler("tile-load-failed", function () {
        state.tileErrors = (state.tileErrors || 0) + 1;
        if (state.tileErrors === 3) {
          const msg = document.createElement("div");
          msg.className = "missing";
          msg.textContent = "Slide tiles could not be loaded from " + tileBase(state.args || args) + ". Behind a reverse " +
            "proxy, set TESSERA_TILE_URL (README: Deploying for a team).";
          grid.prepend(msg);
          setHeight();
        }
      });
      viewer.addHandler("viewport-change", function () {
        if (!state.args || !state.args.sync || (state.leader && state.leader !== viewer)) return;
        const center = viewer.viewport.getCenter(), zoom = viewer.viewport.getZoom();
        state.panels.forEach(function (q) {
          if (q.viewer !== viewer && q.viewer.world.getItemCount()) {
            q.viewer.viewport.zoomTo(zoom, null, true);
            q.viewer.viewport.panTo(center, true);
          }
        });
      });
    });
  }

  function update(args) {
    state.args = args;
    state.renders += 1;
    args.panels.forEach(function (p, i) {
      const panel = state.panels[i];
      if (!panel) return;
      panel.spec = p;
      panel.div.querySelector(".title").textContent = p.title || "";
      panel.div.querySelector(".leg").innerHTML = legendHtml(p);
      panel.div.querySelector(".caption").textContent = p.caption || "";
      const viewer = panel.viewer;
      const slide = viewer.world.getItemAt(0);
      if (!slide) return;    // not open yet: the "open" handler calls update again
      const width = (p.overlay && p.overlay.width_px) ? p.overlay.width_px / p.width : 1;
      const tiled = p.overlay && p.overlay.tiled;
      const overlayKey = tiled ? "tiled:" + tiled.token : (p.overlay && p.overlay.url);
      if (p.overlay && overlayKey !== panel.overlayUrl) {
        const url = overlayKey;
        panel.overlayUrl = url;
        // a slide-sized layer drawn tile by tile by the endpoint (Deep Zoom geometry, no overlap),
        // or one image placed over the slide
        const source = tiled ? { Image: { xmlns: "http://schemas.microsoft.com/deepzoom/2008",
            Url: tileBase(args) + "/overlay/" + tiled.token + "_files/", Format: "png",
            Overlap: "0", TileSize: String(Number(tiled.tile_size) || 256),
            Size: { Width: String(p.width), Height: String(p.height) } } }
          : { type: "image", url: url, buildPyramid: false };
        viewer.addTiledImage({
          tileSource: source,
          // viewport units are fractions of the slide's width, on both axes; a high-resolution
          // layer's grid starts half a tile minus half a step in
          x: (Number(p.overlay.x_px) || 0) / p.width, y: (Number(p.overlay.y_px) || 0) / p.width,
          width: width, opacity: args.opacity,
          success: function (ev) {
            if (panel.overlayUrl !== url) { viewer.world.removeItem(ev.item); return; }   // superseded meanwhile
            // keep the slide (item 0) and this overlay only
            for (let k = viewer.world.getItemCount() - 1; k >= 1; k--) {
              const it = viewer.world.getItemAt(k);
              if (it !== ev.item) viewer.world.removeItem(it);
            }
            panel.overlay = ev.item;
            ev.item.setOpacity(state.args.opacity);
            state.overlayLoads += 1;
          },
        });
      } else if (!p.overlay && panel.overlay) {
        viewer.world.removeItem(panel.overlay); panel.overlay = null; panel.overlayUrl = null;
      }
      if (panel.overlay) panel.overlay.setOpacity(args.opacity);
      if (panel.marker) { viewer.removeOverlay(panel.marker); panel.marker = null; }
      if (p.marker) {
        const el = document.createElement("div");
        el.className = "marker";
        const r = slide.imageToViewportRectangle(p.marker.x, p.marker.y, p.marker.size, p.marker.size);
        viewer.addOverlay({ element: el, location: r });
        panel.marker = el;
      }
    });
    setHeight();
  }

  // resolves when every image of every panel has drawn all the tiles it wants at the current view
  state.whenLoaded = function () {
    return new Promise(function (resolve) {
      function check() {
        const ok = state.panels.length && state.panels.every(function (p) {
          const w = p.viewer.world;
          if (!w.getItemCount()) return false;
          for (let k = 0; k < w.getItemCount(); k++) { if (!w.getItemAt(k).getFullyLoaded()) return false; }
          return true;
        });
        if (ok) resolve(performance.now()); else requestAnimationFrame(check);
      }
      // two frames first: OpenSeadragon decides which tiles a new view needs in its next update
      requestAnimationFrame(function () { requestAnimationFrame(check); });
    });
  };
  // zoom (factor > 1 in) or pan (dx, dy in viewport widths) without animation; resolves with ms to fully loaded
  state.move = function (factor, dx, dy) {
    const t0 = performance.now();
    const v = state.panels[0].viewer.viewport;
    if (factor && factor !== 1) v.zoomBy(factor, null, true);
    if (dx || dy) v.panBy(new OpenSeadragon.Point(dx || 0, dy || 0), true);
    v.applyConstraints(true);
    return state.whenLoaded().then(function (t1) { return t1 - t0; });
  };

  window.addEventListener("message", function (event) {
    const msg = event.data;
    if (event.source !== window.parent || !msg || msg.type !== "streamlit:render") return;
    const args = msg.args || {};
    if (typeof OpenSeadragon === "undefined") {
      grid.innerHTML = '<div class="missing">The viewer library (OpenSeadragon) is not installed on this server: run <code>make setup</code>.</div>';
      setHeight();
      return;
    }
    const layout = JSON.stringify([args.panels.map(function (p) { return p.token; }), args.columns, args.height, args.sync]);
    if (layout !== state.layout) { state.layout = layout; build(args); }
    update(args);
  });
  send("streamlit:componentReady", { apiVersion: 1 });
  setHeight();
})();
