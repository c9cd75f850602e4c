-- Runs one health check the way Argo CD does (the object in the global `obj`, the script's returned table
-- read): lua5.1 run.lua <kind>/health.lua <object.lua>, where object.lua returns the object as a table.
-- Prints "<status>\t<message>". Used by operator/tests/observability.rs.
obj = dofile(arg[2])
local hs = dofile(arg[1])
io.write(hs.status, "\t", hs.message or "", "\n")
