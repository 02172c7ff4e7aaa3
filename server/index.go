package server

import (
	"embed"
	"net/http"
)

// web is the dashboard: a page, a script module and a style sheet, with no
// build step and nothing fetched from elsewhere.
//
//go:embed web/index.html web/app.js web/app.css
var web embed.FS

// dashboardCSP lets the page run only its own script and style and talk
// only to its own origin (WebSocket included): an event's data that got
// past the page's escaping still could not load or run anything.
const dashboardCSP = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; " +
	"base-uri 'none'; form-action 'self'; frame-ancestors 'none'"

// handleAsset serves one embedded file of the dashboard.
func handleAsset(name, contentType string) http.HandlerFunc {
	body, err := web.ReadFile("web/" + name)
	if err != nil {
		panic(err) // embedded above: a missing file is a build error
	}
	return func(w http.ResponseWriter, r *http.Request) {
		h := w.Header()
		h.Set("Content-Type", contentType)
		h.Set("Cache-Control", "no-cache")
		h.Set("X-Content-Type-Options", "nosniff")
		h.Set("Referrer-Policy", "no-referrer")
		h.Set("Content-Security-Policy", dashboardCSP)
		w.Write(body)
	}
}
