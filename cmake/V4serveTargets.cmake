# Helpers that give every v4serve target the same warnings, sanitizers and test registration.

set(V4SERVE_WARNINGS -Wall -Wextra -Wno-unused-parameter -Wno-missing-field-initializers)
if(V4SERVE_WERROR)
  list(APPEND V4SERVE_WARNINGS -Werror)
endif()
if(CMAKE_CXX_COMPILER_ID STREQUAL "Clang")
  list(APPEND V4SERVE_WARNINGS -Wthread-safety)
endif()

if(V4SERVE_SANITIZE)
  add_compile_options(-fsanitize=${V4SERVE_SANITIZE} -fno-omit-frame-pointer -fno-sanitize-recover=all)
  add_link_options(-fsanitize=${V4SERVE_SANITIZE})
  # GCC 12 warns that TSan cannot see atomic_thread_fence, which Boost.Asio's handlers use; with -Werror that
  # stopped the tsan preset at router/http_server.cc. TSan still checks every access around the fences.
  if(V4SERVE_SANITIZE MATCHES "thread" AND CMAKE_CXX_COMPILER_ID STREQUAL "GNU")
    add_compile_options(-Wno-tsan)
  endif()
endif()

# Applies project warnings to a C++ target (never to generated protobuf code).
function(v4serve_warnings target)
  target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CXX>:${V4SERVE_WARNINGS}>)
endfunction()

# v4serve_library(NAME SOURCES ... DEPS ...): one library per top-level folder, public headers at the folder's top.
function(v4serve_library name)
  cmake_parse_arguments(ARG "" "" "SOURCES;DEPS;PRIVATE_DEPS" ${ARGN})
  add_library(${name} STATIC ${ARG_SOURCES})
  target_include_directories(${name} PUBLIC ${PROJECT_SOURCE_DIR})
  target_link_libraries(${name} PUBLIC ${ARG_DEPS} PRIVATE ${ARG_PRIVATE_DEPS})
  v4serve_warnings(${name})
endfunction()

# v4serve_test(NAME SOURCES ... DEPS ... LABELS ... [TIMEOUT s]): a GoogleTest binary registered with ctest.
function(v4serve_test name)
  cmake_parse_arguments(ARG "" "TIMEOUT" "SOURCES;DEPS;LABELS" ${ARGN})
  add_executable(${name} ${ARG_SOURCES})
  target_link_libraries(${name} PRIVATE ${ARG_DEPS} GTest::gmock v4serve_test_main)
  v4serve_warnings(${name})
  if(NOT ARG_TIMEOUT)
    set(ARG_TIMEOUT 300)
  endif()
  add_test(NAME ${name} COMMAND ${name})
  set_tests_properties(${name} PROPERTIES LABELS "${ARG_LABELS}" TIMEOUT ${ARG_TIMEOUT}
    ENVIRONMENT "V4SERVE_SOURCE_DIR=${PROJECT_SOURCE_DIR};V4SERVE_BINARY_DIR=${PROJECT_BINARY_DIR}")
endfunction()

# v4serve_fuzz(NAME SOURCES ... DEPS ... [CORPUS dir]): SOURCES define LLVMFuzzerTestOneInput.
# Always builds NAME_replay, a ctest (label fuzz) that runs the entry point over the seed corpus and a
# few thousand seeded random mutations of it, so every build exercises the target. With V4SERVE_FUZZ=ON
# (clang preset) also builds NAME, a libFuzzer binary for long runs (docs/FUZZING.md).
function(v4serve_fuzz name)
  cmake_parse_arguments(ARG "" "CORPUS" "SOURCES;DEPS" ${ARGN})
  add_executable(${name}_replay ${ARG_SOURCES} ${PROJECT_SOURCE_DIR}/tests/testing/fuzz_replay_main.cc)
  target_link_libraries(${name}_replay PRIVATE ${ARG_DEPS})
  target_include_directories(${name}_replay PRIVATE ${PROJECT_SOURCE_DIR})
  v4serve_warnings(${name}_replay)
  add_test(NAME ${name}_replay COMMAND ${name}_replay ${ARG_CORPUS})
  set_tests_properties(${name}_replay PROPERTIES LABELS "fuzz;unit" TIMEOUT 300)
  if(V4SERVE_FUZZ)
    add_executable(${name} ${ARG_SOURCES})
    target_link_libraries(${name} PRIVATE ${ARG_DEPS})
    target_include_directories(${name} PRIVATE ${PROJECT_SOURCE_DIR})
    target_compile_options(${name} PRIVATE -fsanitize=fuzzer,address,undefined)
    target_link_options(${name} PRIVATE -fsanitize=fuzzer,address,undefined)
  endif()
endfunction()
