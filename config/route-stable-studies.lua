-- Route each stable study to the liver node, once per set of images.
--
-- Orthanc fires OnStableStudy again whenever new instances arrive, including the node's own
-- SEG/SR results. The user metadata "Routed" (declared in orthanc.json as 1024) records how
-- many image instances (anything but SEG/SR/KO/PR) the study held when it was routed; a study is
-- routed again only if it has gained images since, so the node's results never bounce back.
-- Studies holding only SEG/SR objects are never routed.

NODE_MODALITY = 'NODE'  -- the key of the node in "DicomModalities"

NON_IMAGE_MODALITIES = { SEG = true, SR = true, KO = true, PR = true }

local function CountImageInstances(studyId)
  local series = ParseJson(RestApiGet('/studies/' .. studyId .. '/series'))
  local count = 0
  for _, s in ipairs(series) do
    local modality = s['MainDicomTags']['Modality'] or ''
    if not NON_IMAGE_MODALITIES[modality] then
      count = count + #s['Instances']
    end
  end
  return count
end

local function RoutedCount(studyId)
  local names = ParseJson(RestApiGet('/studies/' .. studyId .. '/metadata'))
  for _, name in ipairs(names) do
    if name == 'Routed' then
      return tonumber(RestApiGet('/studies/' .. studyId .. '/metadata/Routed')) or 0
    end
  end
  return 0
end

function OnStableStudy(studyId, tags, metadata)
  local images = CountImageInstances(studyId)
  if images == 0 then
    print('liver-node routing: study ' .. studyId .. ' holds no images (only SEG/SR), not routed')
    return
  end
  local routed = RoutedCount(studyId)
  if images <= routed then
    print('liver-node routing: study ' .. studyId .. ' already routed (' .. routed .. ' images)')
    return
  end
  -- Mark before posting: the job is asynchronous, and a second stable event must not race it.
  RestApiPut('/studies/' .. studyId .. '/metadata/Routed', tostring(images))
  local body = DumpJson({ Resources = { studyId }, Synchronous = false }, true)
  -- RestApiPost returns nil on an HTTP error (it may also raise): treat both as failure.
  local ok, answer = pcall(RestApiPost, '/modalities/' .. NODE_MODALITY .. '/store', body)
  if ok and answer ~= nil then
    print('liver-node routing: study ' .. studyId .. ' (' .. images .. ' images) sent to ' .. NODE_MODALITY)
  else
    -- Undo the mark so that the next stable event retries.
    RestApiPut('/studies/' .. studyId .. '/metadata/Routed', tostring(routed))
    print('liver-node routing: study ' .. studyId .. ' NOT sent: ' .. tostring(answer))
  end
end
