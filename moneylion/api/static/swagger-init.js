// Starts Swagger UI on the API docs page (/schema/swagger), kept out of the page so that its
// content security policy needs no inline script. The schema's URL is the container's
// data-spec; the validator badge (an image from validator.swagger.io) is turned off: the page
// loads nothing from another origin.
"use strict";
window.addEventListener("DOMContentLoaded", function () {
  var container = document.getElementById("swagger-ui");
  window.ui = SwaggerUIBundle({
    url: container.dataset.spec,
    dom_id: "#swagger-ui",
    deepLinking: true,
    validatorUrl: null,
    presets: [SwaggerUIBundle.presets.apis],
  });
});
