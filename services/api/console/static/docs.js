// Starts Swagger UI on /docs with the service's own OpenAPI document. A file rather than an inline script,
// so the page's Content-Security-Policy can refuse every inline script; no validator badge (Swagger UI
// would send the document to validator.swagger.io).
window.ui = SwaggerUIBundle({
  url: "/openapi.json",
  dom_id: "#swagger-ui",
  layout: "BaseLayout",
  deepLinking: true,
  showExtensions: true,
  showCommonExtensions: true,
  validatorUrl: null,
  presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset],
});
