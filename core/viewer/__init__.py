"""The deep-zoom slide viewer's server side: Deep Zoom tiles read from the slide pyramid on demand
(OpenSlide's ``DeepZoomGenerator``), served by a small HTTP endpoint beside the app; and the
front-end library it needs (OpenSeadragon), fetched from the npm registry at setup time."""
