-- Argo CD health of a Lockstep MemberCluster (argocd-cm key resource.customizations.health.lockstep.dev_MemberCluster):
-- Healthy while the hub reaches it (Ready, which mirrors Reachable) and, where its sidecars use gRPC,
-- their tokens can be verified (ServiceAccountKeys); Degraded otherwise; Progressing until the operator
-- has probed the current generation.
local hs = {}
local status = obj.status
local ready = nil
local keys = nil
for _, condition in ipairs((status and status.conditions) or {}) do
  if condition.type == "Ready" then
    ready = condition
  elseif condition.type == "ServiceAccountKeys" then
    keys = condition
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
elseif keys ~= nil and keys.status ~= "True" then
  hs.status = "Degraded"
  hs.message = (keys.reason or "KeysRefused") .. ": " .. (keys.message or "")
else
  hs.status = "Healthy"
  hs.message = ready.message
end
return hs
