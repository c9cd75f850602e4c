-- Argo CD health of a Lockstep MemberCluster (argocd-cm key resource.customizations.health.lockstep.dev_MemberCluster):
-- Healthy while the hub reaches it (Ready, which mirrors Reachable), Degraded otherwise, Progressing until
-- the operator has probed the current generation, as kstatus reads it. (ServiceAccountKeys is left to
-- people: an operator serving plaintext during a migration has no keys to check.)
local hs = {}
local status = obj.status
local ready = nil
for _, condition in ipairs((status and status.conditions) or {}) do
  if condition.type == "Ready" then
    ready = condition
  end
end
local generation = obj.metadata.generation
if ready == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the Lockstep operator to probe the cluster"
elseif generation ~= nil and (status.observedGeneration ~= generation
    or (ready.observedGeneration ~= nil and ready.observedGeneration ~= generation)) then
  hs.status = "Progressing"
  hs.message = "The Lockstep operator has not observed generation " .. generation .. " yet"
elseif ready.status ~= "True" then
  hs.status = "Degraded"
  hs.message = (ready.reason or "NotReady") .. ": " .. (ready.message or "")
else
  hs.status = "Healthy"
  hs.message = ready.message
end
return hs
