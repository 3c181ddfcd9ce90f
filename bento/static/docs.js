// The API docs (/docs): Swagger UI from this service's own files (no CDN, no inline script: the
// service's Content-Security-Policy allows scripts from 'self' only). Keys entered with "Authorize"
// live in this tab only.
window.ui = SwaggerUIBundle({
  url: "/openapi.json",
  dom_id: "#swagger-ui",
  deepLinking: true,
  displayRequestDuration: true,
  filter: true,
  persistAuthorization: false,
});
