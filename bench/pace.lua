-- Fixed-rate pacing for wrk (Debian has no wrk2): each connection waits 8 ms between
-- requests, so 16 connections offer ~2000 requests/s.
function delay()
  return 8
end
