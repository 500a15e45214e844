// GET /docs: Swagger UI over the agent's own OpenAPI document. Loaded as a file (the
// page's Content-Security-Policy allows no inline script). The document's URL is
// relative to the page, so the page also works behind a reverse proxy's path prefix.
"use strict";
window.addEventListener("load", function () {
  var root = document.getElementById("swagger-ui");
  window.ui = SwaggerUIBundle({
    url: new URL(root.dataset.openapi, document.baseURI).href,
    domNode: root,
    deepLinking: true,
    validatorUrl: null, // never send the document to an online validator
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
    docExpansion: "list",
    defaultModelsExpandDepth: 0,
    displayRequestDuration: true,
    persistAuthorization: false,
  });
});
