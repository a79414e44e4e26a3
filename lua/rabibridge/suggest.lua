-- "Did you mean ...?" for names a user typed: config sections and keys,
-- register_call options, function names.
local M = {}

-- Edit distance with adjacent transpositions (optimal string alignment):
-- insertions, deletions, substitutions and swaps of two letters count 1.
function M.distance(a, b)
  local la, lb = #a, #b
  local prev2, prev, cur = {}, {}, {}
  for j = 0, lb do prev[j] = j end
  for i = 1, la do
    cur[0] = i
    local ca = a:byte(i)
    for j = 1, lb do
      local cb = b:byte(j)
      local d = math.min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca == cb and 0 or 1))
      if i > 1 and j > 1 and ca == b:byte(j - 1) and a:byte(i - 1) == cb then
        d = math.min(d, prev2[j - 2] + 1)
      end
      cur[j] = d
    end
    prev2, prev, cur = prev, cur, prev2
  end
  return prev[lb]
end

-- The candidate nearest to word, ignoring case, when it is near enough to be
-- a typo of it (a third of the word's letters, at least one, at most three).
-- candidates: a list of names, or a table whose string keys are the names.
-- -> name | nil
function M.closest(word, candidates)
  if type(word) ~= "string" or word == "" then return nil end
  local names = {}
  if #candidates > 0 then
    for _, name in ipairs(candidates) do names[#names + 1] = name end
  else
    for name in pairs(candidates) do
      if type(name) == "string" then names[#names + 1] = name end
    end
  end
  table.sort(names) -- ties go the same way every time
  local lword = word:lower()
  local limit = math.max(1, math.min(3, math.floor(#word / 3)))
  local best, best_d = nil, limit + 1
  for _, name in ipairs(names) do
    local d = M.distance(lword, name:lower())
    if d < best_d then best, best_d = name, d end
  end
  return best
end

-- " (did you mean 'x'?)" or "", for the end of a message.
function M.hint(word, candidates)
  local name = M.closest(word, candidates)
  return name and (" (did you mean '%s'?)"):format(name) or ""
end

return M
